"""Scratch directories in the cache, which a killed download or conversion cannot leave behind for ever.

What asyncserve builds once (the default model's download and conversion, converted GGUF files, the tiny
model) is written into a scratch directory beside its destination, then renamed into place. The process
filling a scratch directory holds an exclusive `flock` on it; the kernel drops the lock when that process
dies, SIGKILL included. At start-up, a scratch directory whose lock can be taken has no living owner and is
removed; one locked by a concurrent process is left alone.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from typing import Iterator

from asyncserve.checkpoints.cache import cache_dir

try:
    import fcntl
except ImportError:  # no flock (Windows): scratch directories are never judged stale
    fcntl = None

logger = logging.getLogger("asyncserve")

SCRATCH_MARK = ".tmp-"  # a scratch directory is named `.<destination>.tmp-<random>`
_OLDER_SCRATCH_PREFIXES = (".smollm2-download-",)  # names used before the lock existed
# Between mkdtemp and flock a new scratch directory is unlocked for an instant: younger ones are never taken.
MIN_AGE_SECONDS = 60.0


@contextlib.contextmanager
def scratch_dir(parent: str, name: str) -> Iterator[str]:
    """A new scratch directory in `parent` for building `name`, locked while it exists, removed on exit."""
    os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix=f".{name}{SCRATCH_MARK}", dir=parent)
    fd = os.open(path, os.O_RDONLY)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)  # a no-op once renamed into place
        os.close(fd)  # releases the lock


def _is_scratch(entry: str) -> bool:
    return entry.startswith(".") and (SCRATCH_MARK in entry or entry.startswith(_OLDER_SCRATCH_PREFIXES))


def remove_stale_scratch(*parents: str) -> list[str]:
    """Removes the scratch directories in `parents` (default: the cache, its gguf/ and pypi-gguf/ folders) that no living
    process holds; returns their paths."""
    if fcntl is None:
        return []
    removed = []
    for parent in parents or (cache_dir(), os.path.join(cache_dir(), "gguf"), os.path.join(cache_dir(), "pypi-gguf")):
        try:
            entries = os.listdir(parent)
        except OSError:
            continue
        for entry in filter(_is_scratch, entries):
            path = os.path.join(parent, entry)
            if _remove_if_unowned(path):
                removed.append(path)
    if removed:
        logger.info("removed %d scratch directories left by interrupted downloads or conversions: %s",
                    len(removed), ", ".join(removed))
    return removed


def _remove_if_unowned(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # not a directory, or already gone
        return False
    try:
        if time.time() - os.fstat(fd).st_mtime < MIN_AGE_SECONDS:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a living process
            return False
        shutil.rmtree(path, ignore_errors=True)
        return not os.path.exists(path)
    finally:
        os.close(fd)
