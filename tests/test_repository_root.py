"""Run from the repository root, as `python -m pytest`, a script or a tensor-parallel worker is: the
top-level `kernels/` folder must not shadow Hugging Face's `kernels` distribution, which transformers
imports, and our own kernels stay `asyncserve.kernels`."""
from __future__ import annotations

import importlib.metadata
import pathlib
import subprocess
import sys
import sysconfig

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


def test_without_the_distribution_the_name_is_missing_not_ours():
    stdlib = [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]]
    out = _run_at_root(
        f"import sys; sys.path[:] = [''] + {stdlib!r}\n"
        "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('missing', e.name)\n"
        "print('kernels' in sys.modules)")
    assert out.split() == ["missing", "kernels", "False"]


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
