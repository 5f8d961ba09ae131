"""What a user sets about images (vLLM's flags): how many a prompt may carry, where the server may read
file:// images from (nowhere by default), and which hosts http(s) image URLs may name (any by default)."""
from __future__ import annotations

import json
import os

from asyncserve.errors import ConfigError

# Images a prompt may carry when --limit-mm-per-prompt leaves them unsaid: each costs an encoder pass and
# up to thousands of prompt tokens, so the default is a bound, not vLLM's 999.
DEFAULT_IMAGES_PER_PROMPT = 16
_MODALITIES = ("image",)


def parse_limit_mm_per_prompt(value: dict | str | None) -> dict[str, int]:
    """vLLM's JSON ('{"image": 2}') or a dict -> {"image": n}; anything else is a ConfigError."""
    if value is None or value == "":
        return {"image": DEFAULT_IMAGES_PER_PROMPT}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"limit_mm_per_prompt must be JSON such as '{{\"image\": 2}}': {exc}.") from None
    if not isinstance(value, dict):
        raise ConfigError(f"limit_mm_per_prompt must be an object such as {{\"image\": 2}}, got {value!r}.")
    limits = {"image": DEFAULT_IMAGES_PER_PROMPT}
    for name, limit in value.items():
        if name not in _MODALITIES:
            raise ConfigError(f"limit_mm_per_prompt: {name!r} is not a modality asyncserve takes "
                              f"({', '.join(_MODALITIES)}).")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise ConfigError(f"limit_mm_per_prompt[{name!r}] must be an integer >= 0, got {limit!r}.")
        limits[name] = limit
    return limits


def check_local_media_path(path: str | None) -> str | None:
    """--allowed-local-media-path: an existing folder, made absolute (file:// images must lie under it)."""
    if path is None:
        return None
    if not os.path.isdir(path):
        raise ConfigError(f"allowed_local_media_path={path!r} is not a folder.")
    return os.path.realpath(path)


def check_media_domains(domains: list[str] | str | None) -> list[str] | None:
    """--allowed-media-domains: host names (exact, as vLLM compares them), lower-cased; None or [] for any."""
    if domains is None:
        return None
    if isinstance(domains, str):
        domains = [domains]
    if not isinstance(domains, (list, tuple)) or not all(isinstance(domain, str) and domain.strip()
                                                         for domain in domains):
        raise ConfigError(f"allowed_media_domains must be a list of host names, got {domains!r}.")
    return [domain.strip().lower() for domain in domains] or None
