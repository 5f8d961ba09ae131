"""Qwen3.5 (dense: Qwen3_5ForCausalLM) and Qwen3.5-MoE (Qwen3_5MoeForCausalLM): the text part of Qwen's
2026 multimodal checkpoints (`Qwen3_5ForConditionalGeneration`, `Qwen3_5MoeForConditionalGeneration`, whose
config.json nests it under `text_config`). The decoder is Qwen3-Next's (models/qwen3_next.py): Gated
DeltaNet layers and every fourth one gated full attention, with DeltaNet's input projections stored as
separate tensors (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a). Dense checkpoints have a SwiGLU MLP in
every layer; MoE ones experts with a shared expert in every layer, stacked in one tensor per projection
or one per expert.

Left out: the vision encoder (`model.visual.*`: only text prompts are served; its rotary's extra position
sections coincide with plain rotary for text) and the multi-token-prediction head (`mtp.*`, for
speculative decoding, which asyncserve does not run yet).
"""
from __future__ import annotations

from torch import nn

from asyncserve.layers.quantization import QuantizationConfig
from asyncserve.models.llama import LlamaMLP
from asyncserve.models.qwen3_next import Qwen3NextForCausalLM
from asyncserve.models.qwen_moe import QwenSparseMoeBlock

_LANGUAGE_MODEL = "model.language_model."  # the text decoder's prefix in the multimodal checkpoints
_SKIPPED = ("model.visual.", "mtp.")


class Qwen3_5ForCausalLM(Qwen3NextForCausalLM):
    other_architectures = ("Qwen3_5ForConditionalGeneration",)

    def make_mlp(self, hf_config, layer_index: int, quant_config: QuantizationConfig | None,
                 prefix: str) -> nn.Module:
        return LlamaMLP(hf_config, quant_config, prefix)

    def checkpoint_name(self, name: str) -> str | None:
        if name.startswith(_SKIPPED):
            return None
        if name.startswith(_LANGUAGE_MODEL):
            name = "model." + name.removeprefix(_LANGUAGE_MODEL)
        return super().checkpoint_name(name)


class Qwen3_5MoeForCausalLM(Qwen3_5ForCausalLM):
    other_architectures = ("Qwen3_5MoeForConditionalGeneration",)

    def make_mlp(self, hf_config, layer_index: int, quant_config: QuantizationConfig | None,
                 prefix: str) -> nn.Module:
        return QwenSparseMoeBlock(hf_config, quant_config, prefix, renormalize=True)
