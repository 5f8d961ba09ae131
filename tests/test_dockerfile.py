"""The Dockerfile cannot be built here: it is parsed (with BuildKit's own parser) for what the image needs."""
from __future__ import annotations

import fnmatch
import pathlib
import re
import shlex

import dockerfile
import pytest

from asyncserve.cli import build_parser

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def commands() -> list:
    return list(dockerfile.parse_file(str(ROOT / "Dockerfile")))


def _all(commands, name: str) -> list:
    return [command for command in commands if command.cmd == name]


def _one(commands, name: str):
    found = _all(commands, name)
    assert len(found) == 1, f"expected one {name}, found {len(found)}"
    return found[0]


def _env(commands) -> dict:
    env = {}
    for command in _all(commands, "ENV"):
        env.update(zip(command.value[::2], command.value[1::2]))
    return env


def test_base_image_is_a_cuda_pytorch_image_new_enough(commands):
    args = dict(value.split("=", 1) for command in _all(commands, "ARG") for value in command.value if "=" in value)
    image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], _one(commands, "FROM").value[0])
    match = re.fullmatch(r"pytorch/pytorch:(\d+)\.(\d+)(?:\.\d+)?-cuda12\.\d+-cudnn\d+-(?:runtime|devel)", image)
    assert match, f"not a CUDA 12 PyTorch image: {image}"
    required = re.search(r"torch>=(\d+)\.(\d+)", " ".join(_pyproject()["project"]["dependencies"]))
    assert tuple(map(int, match.groups())) >= tuple(map(int, required.groups()))


def test_the_project_is_installed_on_the_images_own_torch(commands):
    pyproject = _pyproject()
    copied = {source for command in _all(commands, "COPY") for source in command.value[:-1]}
    # everything pip needs to build the project: its metadata, readme and every package directory
    needed = {"pyproject.toml", "setup.py", pyproject["project"]["readme"],
              *pyproject["tool"]["setuptools"]["package-dir"].values()}
    assert needed <= copied
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert not [path for path in needed for pattern in ignored if fnmatch.fnmatch(path, pattern)]

    installs = [command.value[0] for command in _all(commands, "RUN") if "pip install" in command.value[0]]
    assert len(installs) == 1
    steps = installs[0].split("&&")
    install = next(shlex.split(step) for step in steps if "pip install" in step)
    args = install[install.index("install") + 1:]
    assert {".", ".[triton]"} & set(args)  # the copied project itself
    assert not [arg for arg in args if re.match(r"torch\b", arg)]  # never a second torch
    # pip must keep the torch the image has: it is pinned from what pip sees installed
    constraint = args[args.index("--constraint") + 1]
    pin = [step for step in steps if f"> {constraint}" in step]
    assert pin and "pip list --format=freeze | grep -i '^torch=='" in pin[0]


def test_entrypoint_is_the_cli_serving_on_port_8000(commands):
    entrypoint, cmd = _one(commands, "ENTRYPOINT"), _one(commands, "CMD")
    assert entrypoint.json and list(entrypoint.value) == ["asyncserve"]
    assert "asyncserve" in _pyproject()["project"]["scripts"]
    assert "8000" in _one(commands, "EXPOSE").value
    assert cmd.json
    args = build_parser().parse_args(list(cmd.value))  # the default arguments are real flags
    assert (args.host, args.port) == ("0.0.0.0", 8000)


def test_model_caches_live_in_a_volume(commands):
    volumes = [pathlib.PurePosixPath(v) for command in _all(commands, "VOLUME") for v in command.value]
    env = _env(commands)
    for variable in ("ASYNCSERVE_CACHE_DIR", "HF_HOME"):
        path = pathlib.PurePosixPath(env[variable])
        assert any(path == volume or volume in path.parents for volume in volumes), variable


def test_readme_shows_docker_run_with_gpus_port_and_cache_volume(commands):
    readme = (ROOT / "README.md").read_text()
    runs = [line for line in readme.splitlines() if line.startswith("docker run ")]
    assert runs, "README has no docker run line"
    words = shlex.split(runs[0])
    assert words[words.index("--gpus") + 1] == "all" and words[words.index("-p") + 1] == "8000:8000"
    volume = words[words.index("-v") + 1]
    mounted = pathlib.PurePosixPath(volume.split(":")[1])
    assert mounted in [pathlib.PurePosixPath(v) for c in _all(commands, "VOLUME") for v in c.value]
