"""Response and tool-call ids without a system call per request.

`uuid.uuid4()` reads `os.urandom`, which releases the GIL: on the event loop, while the step thread runs
Python, taking it back costs up to the interpreter's switch interval (5 ms), once per request; a burst of 256
arrivals stalled the loop on it. One random salt per process and a counter give ids of the same shape (32 hex
digits) that are unique within the process and, by the salt, across processes and restarts."""
from __future__ import annotations

import itertools
import os

_SALT = os.urandom(8).hex()  # 16 hex digits, read once at import
_COUNTER = itertools.count()


def random_hex_id() -> str:
    """32 hex digits: the process's salt, then a counter (next() on itertools.count is atomic under the GIL)."""
    return f"{_SALT}{next(_COUNTER):016x}"
