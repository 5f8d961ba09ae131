"""Requests and the sequences they generate: token ids, progress through the KV cache, status."""
from __future__ import annotations

import enum
import hashlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from asyncserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from asyncserve.engine.detokenizer import IncrementalDetokenizer, NullDetokenizer
    from asyncserve.engine.structured import GrammarMatcher


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted with its KV copied to host memory
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    """A str: it compares equal to, formats as and serializes to "stop" / "length" / "abort"."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


def _salt_key(lora_int_id: int, salt: str) -> int:
    """A non-negative 64-bit key of (adapter, cache_salt), odd so it never equals a bare adapter id's."""
    digest = hashlib.blake2b(f"{lora_int_id}\0{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") | 1 << 63


class Sequence:
    """One generated continuation. Its KV lives in `blocks`; `num_computed_tokens` of its tokens are cached.

    `request` is a back reference, set to None once the finished request is released (`Request.release`),
    so that reference counting, not the cyclic garbage collector, frees both.
    """

    def __init__(self, seq_id: int, request: "Request", token_ids: list[int], index: int = 0,
                 detokenizer: "IncrementalDetokenizer | NullDetokenizer | None" = None,
                 matcher: "GrammarMatcher | None" = None):
        self.seq_id = seq_id
        self.request: Request | None = request
        self.params: SamplingParams = request.params
        self.index = index
        self.token_ids = token_ids
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_computed_tokens = 0
        self.blocks: list = []          # KVCacheBlock objects, owned through the KVCacheManager
        self.block_table: list[int] = []
        self.host_blocks: list[int] = []  # where its KV waits while swapped out
        # Hybrid models: its slot of recurrent state (engine/state_slots.py), or where it waits while swapped.
        self.state_slot: int | None = None
        self.host_state_slot: int | None = None
        self.num_cached_blocks = 0  # leading blocks already offered to the prefix cache
        self.block_hashes: list[int] = []  # hashes of the full blocks of token_ids, grown lazily
        # Chained into the first block's hash: KV computed differently for the same tokens (LongRoPE's
        # long factor set) is never shared with the other kind.
        self.cache_salt = 0
        # LoRA: the request's adapter (0: the base model), chained into the prefix cache's hashes so two
        # adapters never share KV, and the GPU slot it holds while running (-1: none).
        self.lora_int_id = request.lora_request.lora_int_id if request.lora_request is not None else 0
        self.priority_key = (request.priority, seq_id)  # the scheduler's order under the priority policy
        # What the first block's hash chains on besides the KV regime's salt: the adapter, and the request's
        # cache_salt when it has one (0: neither, so the plain base model's hashes stay as they were).
        self.prefix_key = (self.lora_int_id if request.cache_salt is None
                           else _salt_key(self.lora_int_id, request.cache_salt))
        self.lora_slot = -1
        self.recompute_kv_at: int | None = None  # see SchedulerConfig.recompute_kv_at
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict] | None = [] if request.params.logprobs is not None else None
        self.detokenizer = detokenizer  # None for a pooling request, which produces no text
        self.num_preemptions = 0
        # Tokens sampled by launched steps whose results were not processed yet (0 or 1): the step
        # after may already compute them, fed on the device.
        self.num_in_flight = 0
        # How much of the block table the runner holds (the step message sends only what is past it).
        self.num_sent_blocks = 0
        self.block_table_rewritten = False  # changed other than by appending: resend it whole
        # Structured outputs: where the output stands in the request's grammar (None: unconstrained).
        self.matcher = matcher
        # A streaming request's deltas (OutputProcessor.delta_output): what its outputs already carried.
        self.num_sent_tokens = self.num_prompt_tokens  # index in token_ids of the first token not sent yet
        self.num_sent_chars = 0
        self.finish_sent = False
        # Speculative decoding: tokens proposed to follow token_ids in the next step (engine/spec_decode/),
        # and the numpy copy of token_ids the n-gram proposer searches (built on first use).
        self.draft_token_ids: list[int] = []
        self.token_history = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def output_text(self) -> str:
        return self.detokenizer.output_text if self.detokenizer is not None else ""

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, status={self.status.value})")


@dataclass
class Request:
    """What a caller asked for: one prompt, its sampling parameters, and the sequences it spawned."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list | None = None
    first_token_time: float | None = None
    scheduled_time: float | None = None  # when its first sequence was first admitted (vLLM's queue time ends)
    finished_time: float | None = None
    num_cached_tokens: int = 0
    num_forks_pending: int = 0  # best_of - 1 sequences to fork once the prompt is computed
    fork_state_slots: list[int] = field(default_factory=list)  # hybrid models: state slots kept for the forks
    embedding: Any = None  # an embedding model's result ([D] float32 CPU tensor) once the prompt ran
    grammar: Any = None  # the compiled grammar of params.structured_outputs, shared by its sequences
    delta: bool = False  # outputs carry only what is new since the last one (a streaming sink's request)
    lora_request: Any = None  # the LoRARequest it runs with (None: the base model)
    lora_adapter: Any = None  # its adapter's weights in host memory, whatever the host cache evicts
    cache_salt: str | None = None  # vLLM's per-request salt: its prefix-cache blocks are its salt's alone
    priority: int = 0  # with scheduling_policy "priority": lower runs first (vLLM's meaning)
    multimodal: Any = None  # MultiModalInputs: the prompt's images (None: text only)
    # Speculative decoding, this request's share of the engine's counters: [drafts, draft tokens, accepted]
    # (None until a sequence of it verified drafts).
    spec_decode_counts: list[int] | None = None

    def metrics(self) -> dict:
        """RequestOutput.metrics of a finished request: its speculative decoding counts under vLLM's names."""
        if self.spec_decode_counts is None:
            return {}
        drafts, draft_tokens, accepted = self.spec_decode_counts
        return {"spec_decode_num_drafts": drafts, "spec_decode_num_draft_tokens": draft_tokens,
                "spec_decode_num_accepted_tokens": accepted,
                "spec_decode_acceptance_rate": accepted / draft_tokens if draft_tokens else 0.0,
                "spec_decode_mean_acceptance_length": 1.0 + accepted / drafts if drafts else 0.0}

    @property
    def is_finished(self) -> bool:
        if self.num_forks_pending:
            return False
        for seq in self.seqs:  # a loop, not all(genexpr): this runs for every request every step
            if seq.status is not SequenceStatus.FINISHED:
                return False
        return True

    def release(self) -> None:
        """Drops the sequences' back references once nothing in the engine needs them: a finished request
        is then freed by reference counting, without waiting for (and lengthening) a full collection."""
        for seq in self.seqs:
            seq.request = None
