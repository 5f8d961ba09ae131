"""The tensor-core int4 product of few rows (kernels/quant_gemv_mma.py) against the fp32 reference on awkward
sizes (CPU interpreter in fp16, whose tl.dot is exact there; bf16 too on a GPU), what it accepts, and how
the dispatcher and start-up timing reach it."""

import importlib
import os
import subprocess
import sys

import pytest
import torch

import asyncserve.kernels as kernels
from asyncserve.kernels import MmaGemvConfig, SPLIT_K_MAX_ROWS, mma_applies, quant_gemm, quant_gemm_mma
from tests.kernels.test_quant_gemm import _assert_close_to_reference, random_quantized

quant_gemm_module = importlib.import_module("asyncserve.kernels.quant_gemm")
split_k_module = importlib.import_module("asyncserve.kernels.split_k")

CASES = [  # (m, k, n, group_size, config): partial column tiles, rows past 16, splits with and without tiles
    (1, 256, 40, 128, MmaGemvConfig(32, 16, 1, 4, 2)),
    (3, 384, 72, 128, MmaGemvConfig(32, 16, 2, 4, 2)),  # 3 K tiles over 2 splits
    (17, 256, 33, -1, MmaGemvConfig(32, 32, 1, 4, 2)),  # one group: one scale per column
    (5, 512, 64, 256, MmaGemvConfig(64, 16, 3, 4, 2)),  # groups of two tiles
    (40, 384, 24, 128, MmaGemvConfig(16, 16, 5, 4, 2)),  # three row tiles of 16; 5 splits over 3 tiles
    (64, 128, 48, 128, MmaGemvConfig(32, 64, 1, 4, 2)),
    (100, 256, 40, 128, MmaGemvConfig(32, 128, 2, 8, 2)),  # one row tile of 128, partly empty
    # x reordered once per call: the same cases' shapes
    (1, 256, 40, 128, MmaGemvConfig(32, 16, 1, 4, 2, True)),
    (3, 384, 72, 128, MmaGemvConfig(32, 16, 2, 4, 2, True)),
    (17, 256, 33, -1, MmaGemvConfig(32, 32, 1, 4, 2, True)),
    (40, 384, 24, 128, MmaGemvConfig(16, 16, 5, 4, 2, True)),
    # past the workspace's rows: two row tiles of 128, the three K-splits asked for taken as one
    (SPLIT_K_MAX_ROWS + 22, 256, 40, 128, MmaGemvConfig(32, 128, 3, 8, 2, True)),
]


def _dtypes(device):
    return [torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


@pytest.mark.parametrize("m,k,n,group_size,config", CASES)
def test_matches_reference_and_leaves_the_workspace_zeroed(triton_device, monkeypatch, m, k, n, group_size,
                                                           config):
    monkeypatch.setattr(split_k_module, "_split_k_workspace", {})
    for dtype in _dtypes(triton_device):
        qweight, scales, zeros, _ = random_quantized(k, n, k if group_size == -1 else group_size, 4, dtype,
                                                     triton_device)
        x = torch.randn(m, k, device=triton_device).to(dtype)
        out = quant_gemm_mma(x, qweight, scales, zeros, group_size, 4, config)
        _assert_close_to_reference(out, x, qweight, scales, zeros, group_size, 4)
        for workspace, arrivals in split_k_module._split_k_workspace.values():
            assert not workspace.any() and not arrivals.any()


def test_zero_points_and_scales_come_out_exactly(triton_device):
    """Codes equal to their zero point give exactly 0, and a code one above it exactly the scale: the
    MAGIC + q trick and the subtraction of MAGIC + z are exact, not merely close."""
    k, n = 256, 32
    q = torch.randint(0, 16, (k, n), dtype=torch.int32)
    zeros = q.reshape(2, 128, n)[:, 0].float()  # per group, the first code of each column
    q = zeros.repeat_interleave(128, 0).int()  # every code at its zero: W = 0
    q[5] += 1  # row 5: one above the zero -> W = scale
    q = q.clamp(0, 15)
    scales = torch.full((2, n), 0.5)
    x = torch.zeros(1, k)
    x[0, 5] = 2.0
    qweight = kernels.pack_int_rows(q, 4).to(triton_device)
    out = quant_gemm_mma(x.half().to(triton_device), qweight, scales.half().to(triton_device),
                         zeros.half().to(triton_device), 128, 4, MmaGemvConfig(32, 16, 1, 4, 2))
    expected = 2.0 * 0.5 * (q[5] - zeros[0]).float()
    assert torch.equal(out.float().cpu()[0], expected)


@pytest.mark.parametrize("bits,k,group_size,rows,dtype,applies", [
    (4, 4096, 128, 1, torch.bfloat16, True),
    (4, 4096, -1, SPLIT_K_MAX_ROWS, torch.float16, True),
    (4, 4096, 256, 1, torch.bfloat16, True),
    (8, 4096, 128, 1, torch.bfloat16, False),  # 8-bit codes do not fit bf16's 7-bit mantissa above 128
    (4, 4096, 32, 1, torch.bfloat16, False),  # groups smaller than a 128-deep tile
    (4, 4160, 128, 1, torch.bfloat16, False),  # K not in whole tiles
    (4, 4096, 128, 2048, torch.bfloat16, True),  # prefill: row tiles, K not split
    (4, 4096, 128, 1, torch.float32, False),
])
def test_what_it_applies_to(bits, k, group_size, rows, dtype, applies):
    assert mma_applies(torch.zeros(rows, k, dtype=dtype), bits, group_size) is applies


def test_refuses_what_it_does_not_apply_to():
    qweight, scales, zeros, _ = random_quantized(256, 16, 32, 4, torch.float16)
    with pytest.raises(ValueError, match="multiples of 128"):
        quant_gemm_mma(torch.randn(1, 256).half(), qweight, scales, zeros, 32, 4, MmaGemvConfig(32, 16, 1, 4, 2))


@pytest.mark.parametrize("m,plan,expected", [
    (1, None, "mma"),  # the GEMV slot holds an MmaGemvConfig
    (8, ((8, MmaGemvConfig(64, 16, 4, 4, 3)), (128, "dequant")), "mma"),
    (9, ((8, MmaGemvConfig(64, 16, 4, 4, 3)), (128, ((16, 64, 128, 8, 4, 3, False), 2))), "gemm"),
])
def test_dispatcher_takes_the_tensor_core_product_where_chosen(monkeypatch, m, plan, expected):
    calls = []
    monkeypatch.setattr(quant_gemm_module, "quant_gemm_mma", lambda *args: calls.append(("mma", args[-1])))
    monkeypatch.setattr(quant_gemm_module, "quant_gemm_triton", lambda *args: calls.append(("gemm", args[-2:])))
    monkeypatch.setattr(quant_gemm_module, "quant_gemv_triton", lambda *args: calls.append(("gemv",)))
    monkeypatch.setattr(quant_gemm_module, "use_triton", lambda tensor: True)
    qweight, scales, zeros, _ = random_quantized(128, 16, 128, 4, torch.bfloat16)
    gemv_config = MmaGemvConfig(128, 16, 2, 4, 3)
    quant_gemm(torch.randn(m, 128).bfloat16(), qweight, scales, zeros, 128, 4, gemv_config, plan)
    assert [call[0] for call in calls] == [expected]
    if m == 1:
        assert calls[0][1] == gemv_config


def test_candidates_fill_the_sms():
    from asyncserve.layers.quantization.packed_int_timing import mma_candidates
    # one row of the 8B's o_proj on 132 SMs: 64 column tiles of 64 -> 5 splits (2 waves), 32 of 128 -> 9
    assert mma_candidates(1, 4096, 4096, 132) == [MmaGemvConfig(64, 16, 5, 4, 3), MmaGemvConfig(128, 16, 9, 4, 3),
                                                  MmaGemvConfig(64, 16, 5, 4, 3, True),
                                                  MmaGemvConfig(128, 16, 9, 4, 3, True)]
    # gate_up: 448 tiles of 64 fill them already
    assert mma_candidates(1, 4096, 28672, 132)[0] == MmaGemvConfig(64, 16, 1, 4, 3)
    # 40 rows take row tiles of 64; short K keeps two tiles per split; x reordered at both widths
    assert mma_candidates(40, 512, 256, 132) == [MmaGemvConfig(128, 64, 2, 8, 3), MmaGemvConfig(64, 64, 2, 4, 3, True),
                                                 MmaGemvConfig(128, 64, 2, 8, 3, True)]
    # without the reordered form (ASYNCSERVE_QUANT_MMA_PERMUTE_X=0)
    assert mma_candidates(40, 512, 256, 132, permute_x=False) == [MmaGemvConfig(128, 64, 2, 8, 3)]
    # 128 rows of 128 columns: eight warps hold the two accumulators
    assert mma_candidates(128, 4096, 4096, 132)[0] == MmaGemvConfig(128, 128, 9, 8, 3)
    # prefill's rows: row tiles of 128, K not split (the workspace holds 128 rows)
    assert mma_candidates(512, 4096, 4096, 132) == [MmaGemvConfig(128, 128, 1, 8, 3),
                                                    MmaGemvConfig(64, 128, 1, 8, 3, True),
                                                    MmaGemvConfig(128, 128, 1, 8, 3, True)]



def test_start_up_timing_tries_it_unless_switched_off(monkeypatch):
    """A candidate on Ampere or newer unless ASYNCSERVE_QUANT_MMA=0."""
    read = "from asyncserve.layers.quantization import packed_int_timing as t; print(t.MMA_CANDIDATES)"
    for value, expected in ((None, "True"), ("0", "False"), ("1", "True")):
        env = {k: v for k, v in os.environ.items() if k != "ASYNCSERVE_QUANT_MMA"}
        if value is not None:
            env["ASYNCSERVE_QUANT_MMA"] = value
        result = subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True, check=True)
        assert result.stdout.strip() == expected
    from asyncserve.layers.quantization import packed_int_timing
    x = torch.zeros(1, 4096, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(packed_int_timing, "MMA_CANDIDATES", False)
    assert not packed_int_timing._mma_usable(x, 4, 128)
    monkeypatch.setattr(packed_int_timing, "MMA_CANDIDATES", True)
    assert packed_int_timing._mma_usable(x, 4, 128)
    assert not packed_int_timing._mma_usable(x, 8, 128)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert not packed_int_timing._mma_usable(x, 4, 128)
