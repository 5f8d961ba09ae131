"""Start-up on CUDA says what it is doing: loading weights (a bar), profiling memory, capturing graphs, ready."""
from __future__ import annotations

import gc
import logging

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_cuda_start_up_reports_each_phase_in_order(tiny_model_dir, caplog, capfd):
    from asyncserve import LLM
    with caplog.at_level(logging.INFO, logger="asyncserve"):
        llm = LLM(tiny_model_dir("qwen3"), device="cuda", gpu_memory_utilization=0.5, max_num_seqs=8,
                  max_model_len=256)
    log = caplog.text
    assert log.index("profiling memory") < log.index("capturing CUDA graphs") < log.index("engine ready")
    assert "Loading weights (1 file): 100%" in capfd.readouterr().err
    del llm
    gc.collect()
    torch.cuda.empty_cache()
