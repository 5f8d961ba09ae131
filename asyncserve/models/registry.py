"""Which model class serves which Hugging Face architecture name."""
from __future__ import annotations

from asyncserve.errors import UnsupportedModelError
from asyncserve.models import gemma, gpt2, llama, mixtral, opt, phi3, qwen, qwen_moe
from asyncserve.models.base import CausalLM

_ARCHITECTURES = {
    "LlamaForCausalLM": llama.LlamaForCausalLM,
    "MistralForCausalLM": llama.MistralForCausalLM,
    "Qwen2ForCausalLM": llama.Qwen2ForCausalLM,
    "Qwen3ForCausalLM": llama.Qwen3ForCausalLM,
    "QWenLMHeadModel": qwen.QWenLMHeadModel,
    "MixtralForCausalLM": mixtral.MixtralForCausalLM,
    "Qwen2MoeForCausalLM": qwen_moe.Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": qwen_moe.Qwen3MoeForCausalLM,
    "Gemma2ForCausalLM": gemma.Gemma2ForCausalLM,
    "Gemma3ForCausalLM": gemma.Gemma3ForCausalLM,
    "OPTForCausalLM": opt.OPTForCausalLM,
    "GPT2LMHeadModel": gpt2.GPT2LMHeadModel,
    "Phi3ForCausalLM": phi3.Phi3ForCausalLM,
    # The decoder bodies alone, as sentence-transformers saves embedding checkpoints: served as
    # embedding models (pooling_config.py), their LM head dropped.
    "LlamaModel": llama.LlamaForCausalLM,
    "MistralModel": llama.MistralForCausalLM,
    "Qwen2Model": llama.Qwen2ForCausalLM,
    "Qwen3Model": llama.Qwen3ForCausalLM,
}


def register_model(architecture: str, cls: type[CausalLM]) -> None:
    """Serves checkpoints whose config.json names `architecture` with `cls` (a family kept outside
    asyncserve, or a test's toy model)."""
    _ARCHITECTURES[architecture] = cls


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def model_class(hf_config) -> type[CausalLM]:
    names = list(getattr(hf_config, "architectures", None) or [])
    for name in names:
        if name in _ARCHITECTURES:
            return _ARCHITECTURES[name]
    raise UnsupportedModelError(
        f"Model architecture {names or '(none in config.json)'} is not supported. "
        f"Supported architectures: {', '.join(supported_architectures())}.")
