"""Continuous batching: each step, running sequences first, then waiting ones, within a token budget.

Pure Python: it decides which tokens of which sequences are computed; it never touches tensors.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from asyncserve.engine.kv_cache_manager import KVCacheManager
from asyncserve.engine.sequence import Sequence, SequenceStatus
from asyncserve.runner.step import ScheduledSequence, StepInput


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool
    block_size: int
    preemption_mode: str = "recompute"  # or "swap": keep the KV in host memory


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def schedule(self) -> tuple[StepInput, list[tuple[Sequence, int]]]:
        """Chooses this step's work: [(sequence, number of new tokens)] and its description for the runner."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.allocate_slots(seq, num_new):
                victim = self.running.pop()  # the most recently admitted goes first
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                scheduled.append((seq, num_new))
                budget -= num_new
                index += 1
                continue
            break
        # Swapped-out sequences come back before new work is admitted, oldest first.
        while self.swapped and budget > 0 and not preempted:
            seq = self.swapped[0]
            if len(self.running) + 1 > self.config.max_num_seqs or not self.kv.swap_in(seq):
                break
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.kv.allocate_slots(seq, num_new):
                self.kv.free(seq)  # the blocks just swapped in are dropped: recompute it later
                self._requeue_for_recompute(seq)
                self.swapped.popleft()
                break
            self.swapped.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, num_new))
            budget -= num_new
        # Admitting new work while others were just evicted would only thrash the pool.
        while self.waiting and budget > 0 and not preempted and not self.swapped:
            seq = self.waiting[0]
            num_forks = seq.request.num_forks_pending if seq.index == 0 else 0
            if len(self.running) + 1 + num_forks > self.config.max_num_seqs:
                break
            cached = self.kv.find_cached_prefix(seq)
            num_new = seq.num_tokens - seq.num_computed_tokens - len(cached) * self.config.block_size
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            if not self.kv.allocate_slots(seq, num_new, cached):
                break
            self.waiting.popleft()
            if seq.num_preemptions == 0 and seq.index == 0:
                seq.request.num_cached_tokens = len(cached) * self.config.block_size
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, num_new))
            budget -= num_new
        swap_out, swap_in, copies = self.kv.take_block_moves()
        step = StepInput([self._describe(seq, num_new) for seq, num_new in scheduled],
                         block_copies=copies, swap_out=swap_out, swap_in=swap_in)
        return step, scheduled

    def _describe(self, seq: Sequence, num_new: int) -> ScheduledSequence:
        start = seq.num_computed_tokens
        completes = start + num_new == seq.num_tokens
        request = seq.request
        num_samples = 0
        generators = [seq.generator]
        if completes:
            num_samples = 1
            if seq.index == 0 and request.num_forks_pending:
                num_samples += request.num_forks_pending
                generators = request.fork_generators
        wants_prompt_logprobs = (seq.index == 0 and seq.params.prompt_logprobs is not None
                                 and start < seq.num_prompt_tokens - 1
                                 and len(request.prompt_logprobs or ()) < seq.num_prompt_tokens)
        return ScheduledSequence(
            seq_id=seq.seq_id,
            new_token_ids=seq.token_ids[start:start + num_new],
            start_position=start,
            block_table=seq.block_table,
            num_samples=num_samples,
            params=seq.params,
            generators=generators,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=seq.token_ids,
            prompt_logprobs=seq.params.prompt_logprobs if wants_prompt_logprobs else None,
            num_prompt_tokens=seq.num_prompt_tokens,
        )

    def _preempt(self, seq: Sequence) -> None:
        """Frees a running sequence's device blocks: its KV goes to host memory (swap) or is dropped."""
        seq.num_preemptions += 1
        self.num_preemptions += 1
        if self.config.preemption_mode == "swap" and self.kv.swap_out(seq):
            seq.status = SequenceStatus.SWAPPED
            self.swapped.append(seq)
            return
        self.kv.free(seq)
        self._requeue_for_recompute(seq)

    def _requeue_for_recompute(self, seq: Sequence) -> None:
        """Keeps the tokens, forgets the KV, and goes back to the front of the queue."""
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def admit_forks(self, children: list[Sequence]) -> None:
        for child in children:
            child.status = SequenceStatus.RUNNING
            self.running.append(child)

    def finish(self, seq: Sequence) -> None:
        """Frees a finished or aborted sequence's blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        elif seq.status is SequenceStatus.SWAPPED:
            self.swapped.remove(seq)
        self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)
