"""The model contract: everything the runner and the loader may use of a model. Every family subclasses
`CausalLM`; the runner reads nothing else of a model."""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from asyncserve.errors import ConfigError
from asyncserve.layers.attention import AttentionMetadata, PagedAttention
from asyncserve.layers.linear import LinearBase, tune_single_row_products
from asyncserve.layers.recurrent_state import RecurrentStateLayer
from asyncserve.layers.vocab_parallel import lm_head


class CausalLM(nn.Module, ABC):
    """A decoder-only model over a flattened token batch (no padding), built as
    `cls(hf_config, quant_config)`.

    The runner calls `model(input_ids, positions, meta)`, `compute_logits`, `attention_layers`,
    `state_layers` and `tune_single_row`; the loader reads `packed_modules_mapping`, `checkpoint_tensors`,
    `checkpoint_name` and each parameter's `weight_loader` (and `shard_ids`, where a parameter needs more
    shards than its packed module's).
    A family declares its structure (its layers, `embed_tokens`, `build_lm_head`), these names and its
    own rules (`kv_recompute_length`); nothing else. The registry finds it by its class name.
    """

    # The checkpoint names of the projections fused into one of our layers, in shard order
    # (e.g. {"qkv_proj": ("q_proj", "k_proj", "v_proj")}): each is that layer's shard_id.
    packed_modules_mapping: ClassVar[dict[str, tuple[str, ...]]] = {}
    # MoE families: the checkpoint's per-expert projection names -> the FusedMoE shard each fills
    # (e.g. {"w1": "gate", "w3": "up", "w2": "down"} for '...experts.<E>.w1.weight').
    expert_modules_mapping: ClassVar[dict[str, str]] = {}
    # The checkpoint's prefix for the decoder body (absent from our parameter names).
    checkpoint_prefix: ClassVar[str] = "model."
    # config.json `architectures` this class serves besides its own name (read from the class itself,
    # never inherited): the registry (models/registry.py) finds every family of this package.
    other_architectures: ClassVar[tuple[str, ...]] = ()

    # The embedding and LM head: what start-up tuning (and later LoRA) may touch. A family builds them,
    # as every layer, from layers/ (vocabulary-, column- and row-parallel), so the model is the same
    # code at any tensor_parallel_size.
    embed_tokens: nn.Module     # [V, E] token embedding (VocabParallelEmbedding: `.weight` is this rank's rows)
    lm_head: LinearBase | None  # [E] -> [V]; shares embed_tokens.weight when tie_word_embeddings;
                                # None in an embedding model (drop_lm_head)
    tie_word_embeddings: bool   # the checkpoint has no lm_head of its own

    # EAGLE-3 speculative decoding: the runner asks for the residual stream entering given layers, handed
    # at the end of every forward to `sink(aux: list of [T, E], meta)` (None: off, the default). Only a
    # family whose forward collects them sets `supports_aux_hidden_states`.
    supports_aux_hidden_states: ClassVar[bool] = False
    aux_hidden_layer_ids: tuple[int, ...] = ()
    aux_hidden_sink = None

    def expose_aux_hidden_states(self, layer_ids: tuple[int, ...], sink) -> None:
        """Every later forward also hands the hidden states entering `layer_ids` to `sink(aux, meta)`,
        inside the forward (so CUDA graphs capture it too)."""
        if not self.supports_aux_hidden_states:
            raise ConfigError(f"EAGLE-3 reads the target's hidden states after given layers; "
                              f"{type(self).__name__} does not expose them in asyncserve (the Llama family "
                              "does: Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2/3-MoE).")
        num_layers = self.hf_config.num_hidden_layers
        if not layer_ids or any(not 0 <= i <= num_layers for i in layer_ids):
            raise ConfigError(f"EAGLE-3 asks for the hidden states of layers {list(layer_ids)}; the target "
                              f"has {num_layers} layers (ids 0 .. {num_layers}).")
        self.aux_hidden_layer_ids = tuple(layer_ids)
        self.aux_hidden_sink = sink

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """[T] token ids and [T] positions -> [T, E] final hidden states; writes each layer's KV."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[S, E] hidden rows -> [S, V] logits (a one-row call takes the LM head's tuned kernel)."""
        return self.lm_head(hidden)

    def attention_layers(self) -> list[PagedAttention]:
        """The layers that own KV, in order (of construction); the runner sets each one's `kv_cache`."""
        return [module for module in self.modules() if isinstance(module, PagedAttention)]

    def state_layers(self) -> list[RecurrentStateLayer]:
        """The layers that keep a fixed-size state per sequence (hybrid models' linear attention), in order;
        the runner binds each one's `state_cache` to its part of the state pool."""
        return [module for module in self.modules() if isinstance(module, RecurrentStateLayer)]

    @classmethod
    def has_recurrent_state(cls, hf_config) -> bool:
        """Whether a checkpoint of this family has `state_layers` (read before the model is built: the
        engine then sizes a state pool and turns prefix caching off)."""
        return False

    def build_lm_head(self, config, quant_config, tied_by_default: bool, hidden_size: int | None = None) -> None:
        """Sets `tie_word_embeddings` (config.json's, else the family's default) and `lm_head`:
        vocabulary-parallel, sharing `embed_tokens`' weight when tied. Called after `embed_tokens` exists."""
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", tied_by_default))
        self.lm_head = lm_head(hidden_size or config.hidden_size, config.vocab_size, quant_config,
                               tied_to=self.embed_tokens if self.tie_word_embeddings else None)

    def tune_single_row(self) -> None:
        """Times the one-row kernels (on the CPU: weight layouts) of every linear layer, the LM head
        included, on this device; once, at start-up, before the memory profile."""
        tune_single_row_products(self)

    def captures_mixed_steps(self) -> bool:
        """Whether everything outside attention depends on the token count only, never on the step's
        metadata, so that mixed steps can be replayed from CUDA graph pieces (runner/mixed_graphs.py)."""
        return True

    @classmethod
    def kv_recompute_length(cls, hf_config, max_model_len: int) -> int | None:
        """The length past which a sequence's whole KV must be computed again (the model computes KV
        differently beyond it: Phi-3's LongRoPE), or None; read into `SchedulerConfig.recompute_kv_at`."""
        return None

    @classmethod
    def whole_image_tokens(cls, hf_config) -> int | None:
        """The most tokens one image takes when a prefill chunk must hold all of them (its tokens attend
        both ways: Gemma 3), which the step's token budget must cover; None where chunks may cut images."""
        return None

    def drop_lm_head(self) -> None:
        """An embedding model reads final hidden states only: no LM head to load or to hold in memory."""
        self.lm_head = None

    def checkpoint_tensors(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        """The checkpoint's (name, tensor) pairs as this family's layers load them: a family whose
        checkpoints pack, fuse or stack tensors in their own way (GPT-OSS's MXFP4 experts, Qwen3-Next's fused
        projections) rewrites them here (default: as they are)."""
        return weights

    def checkpoint_name(self, name: str) -> str | None:
        """Our parameter name for a checkpoint tensor's name, or None to skip it (a tied or dropped LM head)."""
        if (self.tie_word_embeddings or self.lm_head is None) and name.startswith("lm_head."):
            return None
        return kv_scale_name(name.removeprefix(self.checkpoint_prefix))


# The KV-cache scales' names in the checkpoint formats vLLM reads -> the attention layer's k_scale / v_scale.
_KV_SCALE_NAMES = [
    (re.compile(r"\.([kv])_proj\.output_scale$"), r".attn.\1_scale"),    # compressed-tensors (older)
    (re.compile(r"\.(?:[kv]|qkv)_proj\.([kv])_scale$"), r".attn.\1_scale"),  # ModelOpt
    (re.compile(r"(?<!\.attn)\.([kv])_scale$"), r".attn.\1_scale"),      # self_attn.k_scale (llm-compressor, fp8)
]
# Scales of FP8 attention arithmetic (queries, probabilities): asyncserve attends in the model's dtype.
_UNUSED_ATTENTION_SCALES = re.compile(r"\.(?:q_proj\.output_scale|prob_output_scale|q_scale|prob_scale)$")


def kv_scale_name(name: str) -> str | None:
    """'layers.0.self_attn.k_proj.output_scale' -> 'layers.0.self_attn.attn.k_scale'; other names as they are."""
    if _UNUSED_ATTENTION_SCALES.search(name):
        return None
    for pattern, replacement in _KV_SCALE_NAMES:
        if pattern.search(name):
            return pattern.sub(replacement, name)
    return name
