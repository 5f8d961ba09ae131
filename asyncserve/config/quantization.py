"""The quantization methods a user may name (`--quantization`, config.json's `quant_method`), checked before
anything loads; layers/quantization/ maps each name to its linear method."""
from __future__ import annotations

from asyncserve.errors import ConfigError

METHOD_NAMES = ("gptq", "awq", "fp8", "compressed-tensors", "mxfp4")
# vLLM's names of other kernels for the same checkpoints: we serve them with ours.
ALIASES = {"gptq_marlin": "gptq", "awq_marlin": "awq"}


def supported_methods() -> str:
    return ", ".join(sorted(METHOD_NAMES) + sorted(ALIASES))


def canonical_method(method: str | None) -> str | None:
    """'GPTQ', 'gptq_marlin' -> 'gptq'; an unknown name is returned lower-cased (and refused later)."""
    if method is None:
        return None
    method = str(method).lower()
    return ALIASES.get(method) or method


def check_method_name(method: str | None) -> None:
    """Fails on an unknown `--quantization` before anything loads (its parameters come with the checkpoint)."""
    if method is not None and canonical_method(method) not in METHOD_NAMES:
        raise ConfigError(f"quantization={method!r} is not supported yet (supported: {supported_methods()}); "
                          "serve an unquantized (bf16/fp16) checkpoint.")
