"""What each GGUF architecture means in Hugging Face terms: config.json rebuilt from llama.cpp's metadata,
each tensor's Hugging Face name, and the changes llama.cpp's converter made to tensor values, undone.

Where llama.cpp fixes a hyperparameter in its code instead of writing it to the file (Gemma's sliding
window pattern, local rope base and query scale), the value here is llama.cpp's, which is the original
checkpoint's; transformers' GGUF loading takes its config classes' defaults there instead (wrong for the
27B Gemmas' query scale and for Gemma 3's global rope scaling, right everywhere else).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from asyncserve.errors import ConfigError

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_ATTENTION = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
              "attn_k_norm": "self_attn.k_norm"}
_GATED_MLP = {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
# `blk.N.<name>` -> `model.layers.N.<name>`, per layout
_LLAMA_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", **_ATTENTION, **_GATED_MLP}
_GEMMA_LAYER = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
                **_ATTENTION, **_GATED_MLP}
_PHI3_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
               "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"}  # gate|up rows, fused as in HF

_GEMMA_GELU = "gelu_pytorch_tanh"
# llama.cpp's default soft-caps of Gemma 2, for files that do not state them.
_GEMMA2_SOFTCAPS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
# llama.cpp scales Gemma queries by 1/sqrt(head_dim), but the 27B models' (known by their layer count)
# by 1/sqrt(hidden / heads), as their checkpoints' query_pre_attn_scalar says.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_GEMMA3_LOCAL_ROPE_BASE = 10000.0  # llama.cpp's, unless the file says rope.freq_base_swa


class GGUFView:
    """The metadata and tensors of one GGUF file, as the config builders read them."""

    def __init__(self, path: str, reader, meta: dict):
        self.path = path
        self.meta = meta
        self.arch = meta.get("general.architecture")
        self.tensors = {tensor.name: tensor for tensor in reader.tensors}

    def get(self, key: str, default=None):
        """The architecture's own metadata field `key` (e.g. "attention.head_count")."""
        return self.meta.get(f"{self.arch}.{key}", default)

    def values(self, name: str) -> np.ndarray | None:
        """A (small) tensor's values, flat, in float64; None when the file has no such tensor."""
        tensor = self.tensors.get(name)
        if tensor is None:
            return None
        from gguf import dequantize
        return dequantize(tensor.data, tensor.tensor_type).reshape(-1).astype(np.float64)


def _llama3_rope_factors(theta: float, head_dim: int, factor: float, low_freq_factor: float,
                         high_freq_factor: float, original_max_position: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores as rope_freqs for Llama 3.1-style rope scaling."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    return np.where(wavelen < original_max_position / high_freq_factor, 1.0,
                    np.where(wavelen > original_max_position / low_freq_factor, factor,
                             1 / ((1 - smooth) / factor + smooth)))


def _llama_config(view: GGUFView, config: dict) -> None:
    """Llama 3.1's rope_scaling, recovered from the rope_freqs tensor.

    llama.cpp writes only the resulting factors; every Llama 3.1/3.2/3.3 uses low/high frequency
    factors 1 and 4 and an original context of 8192, so those are checked against the tensor.
    """
    config["attention_bias"] = "blk.0.attn_q.bias" in view.tensors
    stored = view.values("rope_freqs.weight")
    if stored is None:
        return
    scaling = {"rope_type": "llama3", "factor": float(f"{stored.max():.7g}"), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    expected = _llama3_rope_factors(config["rope_theta"], config["head_dim"], scaling["factor"], 1.0, 4.0, 8192)
    if expected.shape != stored.shape or not np.allclose(expected, stored, rtol=1e-5):
        raise ConfigError(f"GGUF file {view.path!r} carries rope_freqs that are not Llama 3.1's rope scaling "
                          "(low/high frequency factors 1 and 4, original context 8192); asyncserve cannot "
                          "recover them. Serve the Hugging Face checkpoint instead.")
    config["rope_scaling"] = scaling


def _qwen_config(view: GGUFView, config: dict) -> None:
    config.update(use_sliding_window=False, sliding_window=None)


def _gemma_config(view: GGUFView, config: dict, global_every: int) -> None:
    """Gemma 2 and 3: GELU-tanh, a query scale, and local layers with one global in every `global_every`."""
    layers = config["num_hidden_layers"]
    window = view.get("attention.sliding_window") or None  # 0: every layer global
    config.update(
        hidden_act=_GEMMA_GELU, hidden_activation=_GEMMA_GELU, sliding_window=window,
        layer_types=["sliding_attention" if window and (i + 1) % global_every else "full_attention"
                     for i in range(layers)],
        query_pre_attn_scalar=(config["hidden_size"] // config["num_attention_heads"]
                               if layers == _GEMMA_27B_LAYERS[view.arch] else config["head_dim"]))


def _gemma2_config(view: GGUFView, config: dict) -> None:
    _gemma_config(view, config, global_every=2)
    config.update({key: view.get(key, default) for key, default in _GEMMA2_SOFTCAPS.items()})


def _gemma3_config(view: GGUFView, config: dict) -> None:
    """Gemma 3: local layers rotate with their own base; rope scaling (4B and up) is the global layers'."""
    _gemma_config(view, config, global_every=6)
    scaling_type = view.get("rope.scaling.type")
    if scaling_type == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": view.get("rope.scaling.factor")}
    elif scaling_type not in (None, "none"):
        raise ConfigError(f"GGUF file {view.path!r} has Gemma 3 rope scaling {scaling_type!r}; asyncserve "
                          "knows linear scaling only (as the Gemma 3 checkpoints use).")
    config.update(rope_local_base_freq=view.get("rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_BASE),
                  final_logit_softcapping=view.get("final_logit_softcapping"), attn_logit_softcapping=None)


def _phi3_config(view: GGUFView, config: dict) -> None:
    """Phi-3 / Phi-4-mini: partial rotary from the rope width, a window (0: none), LongRoPE's factor tensors."""
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    config["head_dim"] = head_dim  # rope.dimension_count is the rotary width, not the head's
    rotary_dim = view.get("rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        config["partial_rotary_factor"] = rotary_dim / head_dim
    config["sliding_window"] = view.get("attention.sliding_window") or None
    original = view.get("rope.scaling.original_context_length")
    if original:
        config["original_max_position_embeddings"] = original
    long_factor, short_factor = view.values("rope_factors_long.weight"), view.values("rope_factors_short.weight")
    if long_factor is None and short_factor is None:
        return
    if long_factor is None or short_factor is None or not original:
        raise ConfigError(f"GGUF file {view.path!r} has LongRoPE factors without both sets and "
                          "rope.scaling.original_context_length; it is not a whole Phi-3 file.")
    # As Phi-3's config.json spells it (transformers 4.45 accepts exactly these three keys).
    scaling = {"type": "longrope", "long_factor": long_factor.tolist(), "short_factor": short_factor.tolist()}
    scale = config["max_position_embeddings"] / original
    default_attention = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
    attention = view.get("rope.scaling.attn_factor")
    if attention is not None and not math.isclose(attention, default_attention, rel_tol=1e-6):
        scaling["attention_factor"] = attention
    config["rope_scaling"] = scaling


@dataclass(frozen=True)
class Architecture:
    model_type: str
    hf_architecture: str
    layer_tensors: dict[str, str]
    configure: Callable[[GGUFView, dict], None]  # config.json fields beyond the shared ones
    # tensors llama.cpp derives from the config (rope scaling): read into config.json, not loaded
    config_tensors: frozenset[str] = frozenset()
    permuted_rotary: bool = False  # llama.cpp interleaved each head's two rotary halves of q/k rows
    norm_offset: float = 0.0  # llama.cpp stored norm weights as w + offset (Gemma's norms scale by 1 + w)

    def hf_name(self, gguf_name: str) -> str | None:
        if gguf_name in _GLOBAL_TENSORS:
            return _GLOBAL_TENSORS[gguf_name]
        parts = gguf_name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in self.layer_tensors:
            return f"model.layers.{parts[1]}.{self.layer_tensors[parts[2]]}.{parts[3]}"
        return None

    def restore(self, gguf_name: str, weight: np.ndarray, config: dict) -> np.ndarray:
        """A float32 tensor as the Hugging Face checkpoint held it."""
        if self.permuted_rotary and ".attn_q." in gguf_name:
            return unpermute_rotary_rows(weight, config["num_attention_heads"])
        if self.permuted_rotary and ".attn_k." in gguf_name:
            return unpermute_rotary_rows(weight, config["num_key_value_heads"])
        if self.norm_offset and gguf_name.endswith("norm.weight"):
            return weight - np.float32(self.norm_offset)
        return weight


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of q/k rows (it interleaves each head's two rotary halves)."""
    head_rows = weight.shape[0] // num_heads // 2
    return (weight.reshape(num_heads, head_rows, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


# GGUF `general.architecture` -> its Hugging Face form
ARCHITECTURES = {
    "llama": Architecture("llama", "LlamaForCausalLM", _LLAMA_LAYER, _llama_config,  # Llama 1-3, Mistral
                          config_tensors=frozenset({"rope_freqs.weight"}), permuted_rotary=True),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM", _LLAMA_LAYER, _qwen_config),
    "qwen3": Architecture("qwen3", "Qwen3ForCausalLM", _LLAMA_LAYER, _qwen_config),
    "gemma2": Architecture("gemma2", "Gemma2ForCausalLM", _GEMMA_LAYER, _gemma2_config, norm_offset=1.0),
    "gemma3": Architecture("gemma3_text", "Gemma3ForCausalLM", _GEMMA_LAYER, _gemma3_config, norm_offset=1.0),
    "phi3": Architecture("phi3", "Phi3ForCausalLM", _PHI3_LAYER, _phi3_config,  # Phi-3, 3.5, Phi-4-mini
                         config_tensors=frozenset({"rope_factors_long.weight", "rope_factors_short.weight"})),
}


def hf_config(view: GGUFView, vocab_size: int) -> dict:
    """config.json of the file's model (its architecture must be one of ARCHITECTURES)."""
    arch = ARCHITECTURES[view.arch]
    hidden, heads = view.get("embedding_length"), view.get("attention.head_count")
    config = {
        "architectures": [arch.hf_architecture], "model_type": arch.model_type, "vocab_size": vocab_size,
        "hidden_size": hidden, "intermediate_size": view.get("feed_forward_length"),
        "num_hidden_layers": view.get("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": view.get("attention.head_count_kv", heads),
        "head_dim": view.get("attention.key_length") or view.get("rope.dimension_count") or hidden // heads,
        "max_position_embeddings": view.get("context_length", 2048),
        "rms_norm_eps": view.get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": view.get("rope.freq_base", 10000.0), "rope_scaling": None,
        "hidden_act": "silu", "tie_word_embeddings": "output.weight" not in view.tensors,
    }
    arch.configure(view, config)
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        value = view.meta.get(f"tokenizer.ggml.{name}")
        if value is not None:
            config[key] = value
    return config
