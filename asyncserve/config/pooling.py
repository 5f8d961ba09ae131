"""Whether a checkpoint runs as a generative or an embedding (pooling) model, and how it pools.

vLLM's rules: `--runner pooling` (or `--convert embed`, or the older `--task embed`) asks for it; with
`auto`, an architecture named like an encoder (`Qwen3Model`, `*EmbeddingModel`, `*ForTextEncoding`)
or a checkpoint that ships a sentence-transformers pooling module (Qwen3-Embedding) runs as one.
How it pools comes from `--pooler-config`, else the sentence-transformers files (modules.json,
1_Pooling/config.json, a Normalize module), else vLLM's default for decoders: last token, normalized.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from asyncserve.errors import ConfigError

logger = logging.getLogger("asyncserve")

RUNNERS = ("auto", "generate", "pooling")
CONVERTS = ("auto", "none", "embed")
TASKS = ("auto", "generate", "embed", "embedding")
POOLING_TYPES = ("LAST", "MEAN", "CLS")
_POOLER_KEYS = {"pooling_type", "seq_pooling_type", "normalize", "use_activation"}
_ENCODER_SUFFIXES = ("EmbeddingModel", "ForTextEncoding", "Model")
_GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # GPT2LMHeadModel, QWenLMHeadModel: not bodies
# sentence-transformers' pooling modes (old keys `pooling_mode_<mode>`: true, or new `pooling_mode`).
_ST_MODES = {"lasttoken": "LAST", "mean_tokens": "MEAN", "mean": "MEAN", "cls_token": "CLS", "cls": "CLS"}


@dataclass(frozen=True)
class PoolerConfig:
    pooling_type: str = "LAST"  # LAST, MEAN or CLS over the prompt's final hidden states
    normalize: bool = True      # L2-normalize the pooled vector


def check_runner_args(runner: str, convert: str, task: str | None) -> None:
    for name, value, allowed in (("runner", runner, RUNNERS), ("convert", convert, CONVERTS),
                                 ("task", task or "auto", TASKS)):
        if value not in allowed:
            raise ConfigError(f"{name}={value!r} is not supported; use one of {', '.join(allowed)} "
                              "(asyncserve serves generative and embedding models).")
    embed = convert == "embed" or task in ("embed", "embedding")
    if embed and (runner == "generate" or task == "generate"):
        raise ConfigError(f"convert={convert!r} / task={task!r} make the model an embedding model: they need "
                          "runner='pooling' (or 'auto'), not 'generate'.")
    if task == "generate" and runner == "pooling":
        raise ConfigError("task='generate' and runner='pooling' contradict each other: give one of them.")


def resolve_runner(runner: str, convert: str, task: str | None, architectures: list[str], path: str) -> str:
    """"generate" or "pooling", from the flags, else from the architecture and the checkpoint's files."""
    if task in ("embed", "embedding"):
        requested = "pooling"
    elif task == "generate":
        requested = "generate"
    else:
        requested = runner
    if convert == "embed":
        requested = "pooling"
    if requested != "auto":
        return requested
    if any(name.endswith(_ENCODER_SUFFIXES) and not name.endswith(_GENERATIVE_SUFFIXES) for name in architectures):
        return "pooling"
    if _sentence_transformers_modules(path) is not None:
        return "pooling"
    return "generate"


def parse_pooler_config(value) -> dict | None:
    """`--pooler-config` / `--override-pooler-config`: a JSON object (or dict) of vLLM's fields."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ConfigError(f"pooler_config must be a JSON object, got {value!r} ({exc}).") from None
    if not isinstance(value, dict):
        raise ConfigError(f"pooler_config must be a JSON object, got {value!r}.")
    unknown = sorted(set(value) - _POOLER_KEYS)
    if unknown:
        raise ConfigError(f"pooler_config fields {unknown} are not supported; asyncserve reads "
                          f"{sorted(_POOLER_KEYS)}.")
    kind = value.get("pooling_type", value.get("seq_pooling_type"))
    if kind is not None and (not isinstance(kind, str) or kind.upper() not in POOLING_TYPES):
        raise ConfigError(f"pooling_type={kind!r} is not supported; use one of {', '.join(POOLING_TYPES)}.")
    for key in ("normalize", "use_activation"):
        if key in value and not isinstance(value[key], bool):
            raise ConfigError(f"pooler_config {key} must be true or false, got {value[key]!r}.")
    return dict(value)


def resolve_pooler(override: dict | None, path: str) -> PoolerConfig:
    """The override's fields, over the sentence-transformers config, over vLLM's default."""
    pooling_type, normalize = "LAST", True
    modules = _sentence_transformers_modules(path)
    if modules is not None:
        pooling_type, normalize = _sentence_transformers_pooler(path, modules)
    override = override or {}
    kind = override.get("pooling_type", override.get("seq_pooling_type"))
    if kind is not None:
        pooling_type = kind.upper()
    normalize = override.get("normalize", override.get("use_activation", normalize))
    return PoolerConfig(pooling_type, normalize)


def _sentence_transformers_modules(path: str) -> list[dict] | None:
    """modules.json's entries when it has a Pooling module (a sentence-transformers checkpoint)."""
    file = os.path.join(path, "modules.json")
    if not os.path.exists(file):
        return None
    with open(file) as f:
        modules = json.load(f)
    if not isinstance(modules, list) or not any(_kind(m) == "Pooling" for m in modules):
        return None
    return modules


def _kind(module: dict) -> str:
    return str(module.get("type", "")).rpartition(".")[2]


def _sentence_transformers_pooler(path: str, modules: list[dict]) -> tuple[str, bool]:
    pooling_type, normalize = None, False
    for module in modules:
        kind = _kind(module)
        if kind == "Transformer":
            continue
        if kind == "Normalize":
            normalize = True
        elif kind == "Pooling":
            with open(os.path.join(path, module.get("path", ""), "config.json")) as f:
                pooling_type = _pooling_mode(json.load(f))
        else:
            raise ConfigError(f"The checkpoint's sentence-transformers module {module.get('type')!r} "
                              "(modules.json) is not supported: asyncserve pools (last, mean, CLS) and "
                              "normalizes, without further layers.")
    return pooling_type, normalize


def _pooling_mode(config: dict) -> str:
    modes = [config["pooling_mode"]] if isinstance(config.get("pooling_mode"), str) else [
        key.removeprefix("pooling_mode_") for key, on in config.items() if key.startswith("pooling_mode_") and on]
    if len(modes) != 1 or modes[0] not in _ST_MODES:
        raise ConfigError(f"The sentence-transformers pooling mode {modes} (1_Pooling/config.json) is not "
                          "supported; asyncserve pools by last token, mean or CLS, one of them.")
    return _ST_MODES[modes[0]]
