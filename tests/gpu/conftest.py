"""GPU tests: engines on CUDA over the tiny checkpoints, checked for a clean block pool afterwards, their CUDA
graph captures checked for host copies (runner/capture_guard.py)."""
import os

import pytest

os.environ.setdefault("ASYNCSERVE_CHECK_CAPTURES", "1")

from tests.conftest import assert_pool_clean


@pytest.fixture
def make_cuda_llm(tiny_model_dir):
    from asyncserve import LLM
    made = []

    def make(family, **kwargs):
        kwargs.setdefault("num_gpu_blocks_override", 512)
        kwargs.setdefault("max_num_seqs", 16)
        llm = LLM(tiny_model_dir(family), device="cuda", **kwargs)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        assert_pool_clean(llm.llm_engine)
