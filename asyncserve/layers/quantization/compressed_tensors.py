"""compressed-tensors checkpoints (llm-compressor's format): served when their scheme is FP8 e4m3
weights with per-tensor or per-channel scales (activations static, dynamic or absent), through the FP8
method; any other scheme is refused by name."""
from __future__ import annotations

from asyncserve.errors import ConfigError
from asyncserve.layers.quantization.fp8 import FP8Config


def _describe(weights: dict) -> str:
    return (f"weights type={weights.get('type')!r} num_bits={weights.get('num_bits')} "
            f"strategy={weights.get('strategy')!r}")


class CompressedTensorsConfig(FP8Config):
    """The FP8 config, read from compressed-tensors' `config_groups` (its only scheme served here)."""

    name = "compressed-tensors"

    @classmethod
    def from_config(cls, config: dict) -> CompressedTensorsConfig:
        _check_kv_cache_scheme(config.get("kv_cache_scheme"))
        groups = list((config.get("config_groups") or {}).values())
        if not groups:
            raise ConfigError("quantization='compressed-tensors' needs a compressed-tensors checkpoint: its "
                              "config.json quantization_config (config_groups) says how weights are stored.")
        schemes = {(_describe(group.get("weights") or {}), _activations(group)) for group in groups}
        if len(schemes) > 1:
            raise ConfigError(f"compressed-tensors with several schemes ({sorted(schemes)}) is not supported: "
                              "asyncserve serves one FP8 scheme for every linear layer.")
        weights = groups[0].get("weights") or {}
        fmt = config.get("format")
        if (weights.get("type") != "float" or weights.get("num_bits") != 8
                or weights.get("strategy") not in ("tensor", "channel")
                or fmt not in (None, "float-quantized", "naive-quantized")):
            raise ConfigError(f"compressed-tensors with {_describe(weights)} format={fmt!r} is not supported "
                              "(supported: FP8 weights, type='float' num_bits=8, strategy 'tensor' or "
                              "'channel').")
        targets = set(groups[0].get("targets") or ["Linear"])
        if targets != {"Linear"}:
            raise ConfigError(f"compressed-tensors targets {sorted(targets)} are not supported (supported: "
                              "['Linear']).")
        return cls(True, _activations(groups[0]), list(config.get("ignore") or []))


def _activations(group: dict) -> str:
    """'static' (an input_scale per layer) or 'dynamic' (per-token scales, or weight-only)."""
    activations = group.get("input_activations")
    if activations and not activations.get("dynamic", False):
        return "static"
    return "dynamic"


def _check_kv_cache_scheme(scheme: dict | None) -> None:
    """KV-cache scales are served per tensor for an e4m3 pool (`--kv-cache-dtype fp8`); others are named."""
    if scheme and (scheme.get("type") != "float" or scheme.get("num_bits") != 8
                   or scheme.get("strategy", "tensor") != "tensor"):
        raise ConfigError(f"compressed-tensors kv_cache_scheme type={scheme.get('type')!r} "
                          f"num_bits={scheme.get('num_bits')} strategy={scheme.get('strategy')!r} is not "
                          "supported (supported: type='float' num_bits=8 strategy='tensor', served with "
                          "--kv-cache-dtype fp8).")
