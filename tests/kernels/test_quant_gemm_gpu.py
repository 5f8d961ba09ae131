"""Quantized GEMM/GEMV at Llama-3.1-8B projection shapes on a GPU, bf16/fp16 against the fp32
reference."""

import pytest
import torch

from asyncserve.kernels import (QUANT_GEMM_CONFIGS, QUANT_GEMV_CONFIGS, pack_int_rows, quant_gemm,
                                quant_gemm_triton, quant_gemv_triton)
from tests.kernels.test_quant_gemm import _assert_close_to_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# (K, N): fused QKV, o_proj, fused gate_up, down_proj.
LLAMA_8B_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
HALF_DTYPES = [torch.bfloat16, torch.float16]


def _quantized(k, n, group_size, bits, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    num_groups = -(-k // group_size)
    q = torch.randint(0, 1 << bits, (k, n), generator=gen, device="cuda", dtype=torch.int32)
    scales = ((torch.rand(num_groups, n, generator=gen, device="cuda") + 0.5) * 0.02).to(dtype)
    zeros = torch.randint(0, 1 << bits, (num_groups, n), generator=gen, device="cuda").to(dtype)
    x = torch.randn(8192, k, generator=gen, device="cuda").to(dtype)
    return x, pack_int_rows(q, bits), scales, zeros


_assert_close = _assert_close_to_reference  # the CPU tests' check, at real shapes


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("k,n", LLAMA_8B_SHAPES)
@pytest.mark.parametrize("bits,group_size", [(4, 128), (8, 128), (4, 32), (4, -1)])
def test_real_shapes_through_the_dispatcher(k, n, bits, group_size, dtype):
    x, qweight, scales, zeros = _quantized(k, n, k if group_size == -1 else group_size, bits,
                                           dtype)
    for m in (1, 3, 5, 64, 512):  # GEMV, GEMV for a few rows, and the GEMM's tile sizes
        rows = x[:m]
        _assert_close(quant_gemm(rows, qweight, scales, zeros, group_size, bits), rows, qweight,
                      scales, zeros, group_size, bits)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_gemm_up_to_8192_rows(dtype):
    x, qweight, scales, zeros = _quantized(4096, 6144, 128, 4, dtype)
    for m in (8192, 1000):
        _assert_close(quant_gemm_triton(x[:m], qweight, scales, zeros, 128, 4), x[:m], qweight,
                      scales, zeros, 128, 4)


@pytest.mark.parametrize("config", QUANT_GEMV_CONFIGS)
def test_every_gemv_config(config):
    x, qweight, scales, zeros = _quantized(14336, 4096, 128, 4, torch.bfloat16)
    for m in (1, 2, 4):
        out = quant_gemv_triton(x[:m], qweight, scales, zeros, 128, 4, config)
        _assert_close(out, x[:m], qweight, scales, zeros, 128, 4)


@pytest.mark.parametrize("config", [row[1:-1] + (compact,) for row in QUANT_GEMM_CONFIGS
                                    for compact in (False, True)])
def test_every_gemm_config(config):
    x, qweight, scales, zeros = _quantized(4096, 4096, 32, 8, torch.float16)
    out = quant_gemm_triton(x[:300], qweight, scales, zeros, 32, 8, config)
    _assert_close(out, x[:300], qweight, scales, zeros, 32, 8)


def test_gemv_replays_in_a_cuda_graph_with_new_inputs():
    x, qweight, scales, zeros = _quantized(4096, 6144, 128, 4, torch.bfloat16)
    static_x = x[:1].clone()
    quant_gemm(static_x, qweight, scales, zeros, 128, 4)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = quant_gemm(static_x, qweight, scales, zeros, 128, 4)
    static_x.copy_(x[7:8])
    graph.replay()
    _assert_close(static_out, x[7:8], qweight, scales, zeros, 128, 4)


@pytest.mark.parametrize("k,n", LLAMA_8B_SHAPES)
def test_many_rows_dequantize_into_the_scratch_and_replay_in_a_graph(k, n):
    """From DEQUANT_MIN_ROWS rows on, the dispatcher dequantizes into the scratch reserved at load and
    multiplies with cuBLAS, also inside a CUDA graph."""
    from asyncserve.kernels import DEQUANT_MIN_ROWS, reserve_dequant_scratch
    x, qweight, scales, zeros = _quantized(k, n, 128, 4, torch.bfloat16)
    reserve_dequant_scratch(k * n, torch.bfloat16, x.device)
    for m in (DEQUANT_MIN_ROWS, 512, 4096):
        _assert_close(quant_gemm(x[:m], qweight, scales, zeros, 128, 4), x[:m], qweight, scales,
                      zeros, 128, 4)
    static_x = x[:256].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = quant_gemm(static_x, qweight, scales, zeros, 128, 4)
    static_x.copy_(x[1000:1256])
    graph.replay()
    _assert_close(static_out, x[1000:1256], qweight, scales, zeros, 128, 4)


@pytest.mark.parametrize("config", [c for c in QUANT_GEMV_CONFIGS if c[2] > 1 and c[5]])
def test_one_kernel_split_k_replays_in_a_graph_and_leaves_the_workspace_zeroed(config):
    """The K-splits meet in the workspace reserved at load: graph replays with new inputs, over the four
    8B shapes in turn as a model's layers call them, give the reference each time, and the workspace and
    its counters are zero after every replay (else the next call would add stale sums)."""
    from asyncserve.kernels import split_k
    from asyncserve.kernels.split_k import reserve_split_k_workspace
    layers = [_quantized(k, n, 128, 4, torch.bfloat16, seed=i) for i, (k, n) in enumerate(LLAMA_8B_SHAPES)]
    for _, qweight, _, _ in layers:
        reserve_split_k_workspace(qweight.shape[1], torch.device("cuda"))
    inputs = [x[:2].clone() for x, _, _, _ in layers]
    for static_x, (x, qweight, scales, zeros) in zip(inputs, layers):  # compile outside the capture
        quant_gemv_triton(static_x, qweight, scales, zeros, 128, 4, config)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [quant_gemv_triton(static_x, qweight, scales, zeros, 128, 4, config)
                for static_x, (x, qweight, scales, zeros) in zip(inputs, layers)]
    workspace, arrivals = split_k._split_k_workspace[inputs[0].device]
    assert workspace.numel() >= 128 * 28672  # reserved before the capture: the captured kernels use it
    for start in (100, 2000, 5000):
        for static_x, (x, _, _, _) in zip(inputs, layers):
            static_x.copy_(x[start:start + 2])
        graph.replay()
        torch.cuda.synchronize()
        for out, (x, qweight, scales, zeros) in zip(outs, layers):
            _assert_close(out, x[start:start + 2], qweight, scales, zeros, 128, 4)
        assert not workspace.any() and not arrivals.any()


def test_start_up_timing_picks_a_timed_config_that_matches_the_reference():
    from asyncserve.kernels import QUANT_GEMV_TIMED
    from asyncserve.layers.quantization.packed_int_timing import fastest_quant_gemv_config
    x, qweight, scales, zeros = _quantized(4096, 6144, 128, 4, torch.bfloat16)
    config, table_ms, best_ms = fastest_quant_gemv_config(qweight, scales, zeros, 128, 4)
    assert config in QUANT_GEMV_TIMED and 0 < best_ms <= table_ms
    _assert_close(quant_gemm(x[:1], qweight, scales, zeros, 128, 4, config), x[:1], qweight, scales, zeros, 128, 4)


def test_start_up_row_plan_covers_the_buckets_and_its_choices_match_the_reference():
    from asyncserve.kernels import reserve_dequant_scratch
    from asyncserve.layers.quantization.packed_int_timing import ROW_BUCKETS, fastest_row_plan
    x, qweight, scales, zeros = _quantized(4096, 4096, 128, 4, torch.bfloat16)
    reserve_dequant_scratch(4096 * 4096, torch.bfloat16, x.device)
    plan, report = fastest_row_plan(qweight, scales, zeros, 128, 4)
    assert [rows for rows, _ in plan] == list(ROW_BUCKETS) and len(report) == len(ROW_BUCKETS)
    for m in (5, 8, 13, 40, 64, 100, 128, 129, 300, 512, 1000, 1024, 1025):
        _assert_close(quant_gemm(x[:m], qweight, scales, zeros, 128, 4, None, plan), x[:m], qweight, scales, zeros,
                      128, 4)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("k,n", LLAMA_8B_SHAPES)
def test_tensor_core_product_at_real_shapes(k, n, dtype):
    """kernels/quant_gemv_mma.py at the 8B's shapes, 1 to 1,000 rows, with the candidates start-up timing tries
    (K-splits meeting in the workspace up to 128 rows, row tiles past them), also replayed in a CUDA graph with
    new inputs."""
    from asyncserve.kernels import quant_gemm_mma
    from asyncserve.kernels.split_k import reserve_split_k_workspace
    from asyncserve.layers.quantization.packed_int_timing import mma_candidates
    x, qweight, scales, zeros = _quantized(k, n, 128, 4, dtype)
    reserve_split_k_workspace(n, x.device)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for m in (1, 2, 16, 17, 64, 128, 200, 1000):
        for config in mma_candidates(m, k, n, num_sms):
            _assert_close(quant_gemm_mma(x[:m], qweight, scales, zeros, 128, 4, config), x[:m], qweight, scales,
                          zeros, 128, 4)
    config = mma_candidates(1, k, n, num_sms)[0]
    static_x = x[:1].clone()
    quant_gemm_mma(static_x, qweight, scales, zeros, 128, 4, config)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = quant_gemm_mma(static_x, qweight, scales, zeros, 128, 4, config)
    for start in (100, 5000):
        static_x.copy_(x[start:start + 1])
        graph.replay()
        _assert_close(out, static_x, qweight, scales, zeros, 128, 4)
