"""Which model class serves which Hugging Face architecture name: every `CausalLM` family defined in a
module of this package serves its class name (and its own `other_architectures`), found on first use,
so a new family is its model file alone; `register_model` adds one kept outside asyncserve."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

from asyncserve.errors import UnsupportedModelError
from asyncserve.models.base import CausalLM

_registered: dict[str, type[CausalLM]] = {}
# Architectures refused by name, with why (a plain "not supported" would leave a user guessing).
_REFUSED = {
    "Qwen3VLMoeForConditionalGeneration": (
        "Qwen3-VL-MoE is not served: its checkpoints stack each layer's experts into fused 3D tensors, which "
        "our Qwen3-MoE layers do not load; the dense Qwen3VLForConditionalGeneration is served."),
}
_found: dict[str, type[CausalLM]] | None = None


def _families() -> dict[str, type[CausalLM]]:
    global _found
    if _found is None:
        import asyncserve.models as package
        found: dict[str, type[CausalLM]] = {}
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            for cls in vars(module).values():
                if (isinstance(cls, type) and issubclass(cls, CausalLM) and cls.__module__ == module.__name__
                        and not inspect.isabstract(cls)):
                    for name in (cls.__name__, *vars(cls).get("other_architectures", ())):
                        found[name] = cls
        _found = found
    return {**_found, **_registered}


def register_model(architecture: str, cls: type[CausalLM]) -> None:
    """Serves checkpoints whose config.json names `architecture` with `cls` (a family kept outside
    asyncserve, or a test's toy model)."""
    _registered[architecture] = cls


def supported_architectures() -> list[str]:
    return sorted(_families())


def model_class(hf_config) -> type[CausalLM]:
    names = list(getattr(hf_config, "architectures", None) or [])
    families = _families()
    for name in names:
        if name in families:
            return families[name]
    for name in names:
        if name in _REFUSED:
            raise UnsupportedModelError(_REFUSED[name])
    raise UnsupportedModelError(
        f"Model architecture {names or '(none in config.json)'} is not supported. "
        f"Supported architectures: {', '.join(supported_architectures())}.")
