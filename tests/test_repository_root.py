"""Run from the repository root, as `python -m pytest`, a script or a tensor-parallel worker is: the
top-level `kernels/` folder must not shadow Hugging Face's `kernels` distribution, which transformers
imports, and our own kernels stay `asyncserve.kernels`."""
from __future__ import annotations

import importlib.metadata
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_at_root(code: str, timeout: float = 300) -> str:
    """`python -c code` with the repository root as working directory (sys.path[0] is '')."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_hugging_faces_kernels_is_installed_for_these_tests():
    assert importlib.metadata.version("kernels")  # pyproject's test extra brings it


def test_top_level_kernels_is_the_installed_distribution_from_the_root():
    out = _run_at_root(
        "import kernels, transformers.integrations.hub_kernels, asyncserve.kernels as ours\n"
        "print(kernels.__file__); print(ours.__file__); print(ours.rms_norm.__module__)\n"
        "from kernels import CUDAProperties")
    theirs, ours, module = out.split()
    assert not pathlib.Path(theirs).is_relative_to(ROOT)
    assert pathlib.Path(ours) == ROOT / "kernels" / "__init__.py"
    assert module == "asyncserve.kernels.norm"


def test_without_the_distribution_the_name_is_an_empty_placeholder_transformers_counts_as_absent():
    """No Hugging Face kernels installed (as on the lent GPU machine): transformers' availability check
    imports `kernels` from the root and must hear "absent", not crash `import transformers.models...`;
    `from kernels import anything` still fails as an ImportError."""
    out = _run_at_root(
        "import importlib.machinery as machinery, importlib.metadata as metadata\n"
        "real_find, real_version = machinery.PathFinder.find_spec, metadata.version\n"
        "def find_spec(cls, name, path=None, target=None):  # the distribution is not installed\n"
        "    return None if name == 'kernels' and path is not None else real_find(name, path, target)\n"
        "def version(name):\n"
        "    if name == 'kernels':\n"
        "        raise metadata.PackageNotFoundError(name)\n"
        "    return real_version(name)\n"
        "machinery.PathFinder.find_spec, metadata.version = classmethod(find_spec), version\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "import transformers.models.gemma2.modeling_gemma2\n"
        "import kernels, asyncserve.kernels as ours\n"
        "print(is_kernels_available(), kernels.__file__, ours.rms_norm.__module__)\n"
        "try:\n    from kernels import get_kernel\nexcept ImportError:\n    print('ImportError')\n")
    assert out.split() == ["False", "None", "asyncserve.kernels.norm", "ImportError"]


def test_llm_and_two_tensor_parallel_ranks_run_from_the_root(tiny_model_dir):
    path = tiny_model_dir("qwen3")
    code = (
        "from asyncserve import LLM, SamplingParams\n"
        "greedy = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)\n"
        f"kwargs = dict(device='cpu', dtype='float32', num_gpu_blocks_override=64, max_model_len=128)\n"
        f"one = LLM({path!r}, **kwargs).generate(['hello world'], greedy, use_tqdm=False)\n"
        f"two = LLM({path!r}, tensor_parallel_size=2, **kwargs).generate(['hello world'], greedy, use_tqdm=False)\n"
        "print(*one[0].outputs[0].token_ids); print(*two[0].outputs[0].token_ids)")
    one, two = _run_at_root(code).strip().splitlines()
    assert len(one.split()) == 5
    assert one == two
