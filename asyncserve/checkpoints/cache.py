"""Where asyncserve keeps what it builds once (the default model, converted GGUF files, tiny models)."""
from __future__ import annotations

import os


def cache_dir() -> str:
    """`$ASYNCSERVE_CACHE_DIR`, else `~/.cache/asyncserve`."""
    return os.environ.get("ASYNCSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "asyncserve")
