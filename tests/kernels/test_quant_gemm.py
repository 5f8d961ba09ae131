"""Weight-only quantized GEMM/GEMV: packing round trip, the reference against an explicit
dequantization, and the Triton kernels against the fp32 reference on awkward sizes."""

import importlib

import pytest
import torch

import asyncserve.kernels as kernels
from asyncserve.kernels import (HAS_TRITON, dequantize_int_rows, dequantize_triton, pack_int_rows,
                                quant_gemm, quant_gemm_ref, quant_gemm_triton, quant_gemv_triton,
                                unpack_int_rows)

# The package exports the function `quant_gemm`, which hides the module of the same name.
quant_gemm_module = importlib.import_module("asyncserve.kernels.quant_gemm")
split_k_module = importlib.import_module("asyncserve.kernels.split_k")


def random_quantized(k, n, group_size, bits, dtype=torch.float32, device="cpu", seed=0):
    """Random codes, positive scales near 0.02, integer zero points: qweight, scales, zeros, q."""
    gen = torch.Generator().manual_seed(seed)
    num_groups = -(-k // group_size)
    q = torch.randint(0, 1 << bits, (k, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(num_groups, n, generator=gen) + 0.5) * 0.02
    zeros = torch.randint(0, 1 << bits, (num_groups, n), generator=gen).float()
    return pack_int_rows(q, bits).to(device), _poison_after(scales, dtype, device), \
        _poison_after(zeros, dtype, device), q


def _poison_after(groups, dtype, device):
    """The rows in memory right after the last group are NaN: a kernel reading past it fails."""
    padded = torch.full((groups.shape[0] + 2, groups.shape[1]), float("nan"), dtype=dtype,
                        device=device)
    padded[:groups.shape[0]] = groups.to(device, dtype)
    return padded[:groups.shape[0]]


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_round_trip_and_bit_layout(bits):
    per = 32 // bits
    q = torch.randint(0, 1 << bits, (5 * per, 7), dtype=torch.int32)
    q[:per, 0] = (1 << bits) - 1  # an all-ones int32: its top bit makes it negative
    packed = pack_int_rows(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, 7)
    assert packed[0, 0] == -1
    assert torch.equal(unpack_int_rows(packed, bits, 5 * per), q)
    assert torch.equal(pack_int_rows(q.t().contiguous().t(), bits), packed)  # strided input
    # Row k lives in int32 k // per at bit (k % per) * bits, lowest bits first.
    for k in (0, 1, per - 1, per + 3, 5 * per - 1):
        word = int(packed[k // per, 2]) & 0xFFFFFFFF
        assert (word >> (k % per) * bits) & ((1 << bits) - 1) == q[k, 2]


def test_pack_rejects_bad_inputs():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int_rows(torch.zeros(12, 3, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        pack_int_rows(torch.full((8, 3), 16, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="4 or 8 bits"):
        pack_int_rows(torch.zeros(8, 3, dtype=torch.int32), 3)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 64), (4, 96)])
def test_reference_is_x_times_dequantized_weight(bits, group_size):
    k, n = 96, 40
    qweight, scales, zeros, q = random_quantized(k, n, group_size, bits, torch.float64)
    x = torch.randn(3, k, dtype=torch.float64)
    weight = torch.empty(k, n, dtype=torch.float64)
    for row in range(k):
        group = row // group_size
        weight[row] = (q[row].double() - zeros[group]) * scales[group]
    torch.testing.assert_close(dequantize_int_rows(qweight, scales, zeros, group_size, bits, k,
                                                   torch.float64), weight)
    torch.testing.assert_close(quant_gemm_ref(x, qweight, scales, zeros, group_size, bits),
                               x @ weight)
    # GPTQ's -1, and a group larger than K (a narrow layer), name the same single group as K.
    if group_size == k:
        for single_group in (-1, 2 * k):
            out = quant_gemm_ref(x, qweight, scales, zeros, single_group, bits)
            torch.testing.assert_close(out, x @ weight)


def test_shapes_are_checked_with_actionable_messages():
    qweight, scales, zeros, _ = random_quantized(64, 8, 32, 4)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="qweight must be int32"):
        quant_gemm_ref(torch.randn(2, 72), qweight, scales, zeros, 32, 4)
    with pytest.raises(ValueError, match="scales must be"):
        quant_gemm_ref(x, qweight, scales[:1], zeros, 32, 4)
    with pytest.raises(ValueError, match="zeros must be"):
        quant_gemm_ref(x, qweight, scales, zeros.half(), 32, 4)
    with pytest.raises(ValueError, match="group_size 12"):
        quant_gemm_ref(x, qweight, scales, zeros, 12, 4)


def _assert_close_to_reference(out, x, qweight, scales, zeros, group_size, bits):
    """The kernel in half precision against the fp32 reference from the same half inputs."""
    expected = quant_gemm_ref(x.float(), qweight, scales.float(), zeros.float(), group_size, bits)
    assert out.dtype == x.dtype and out.shape == expected.shape
    relative = (out.float() - expected).norm() / expected.norm()
    assert relative < 1e-2, f"relative error {relative:.2e}"
    tolerance = 3e-2 if x.dtype == torch.bfloat16 else 1e-2
    torch.testing.assert_close(out.float(), expected, atol=tolerance * expected.abs().max(),
                               rtol=tolerance)


# Awkward sizes: K not a multiple of the K tile, N not of the N tile, groups that do and do not
# fill a tile, and the single group (group_size = K).
CASES = [  # (m, k, n, group_size, bits, dtype)
    (3, 96, 40, 32, 4, torch.float16),
    (5, 160, 72, 32, 8, torch.bfloat16),
    (17, 320, 40, 64, 4, torch.bfloat16),
    (6, 320, 72, 320, 8, torch.float16),
    (9, 160, 40, 160, 4, torch.bfloat16),
]


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("m,k,n,group_size,bits,dtype", CASES)
def test_triton_gemm_matches_reference(triton_device, m, k, n, group_size, bits, dtype, compact):
    qweight, scales, zeros, _ = random_quantized(k, n, group_size, bits, dtype, triton_device)
    x = torch.randn(m, k, device=triton_device).to(dtype)
    config = (16, 32, 64, 2, 4, 1, compact)  # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages)
    out = quant_gemm_triton(x, qweight, scales, zeros, group_size, bits, config)
    _assert_close_to_reference(out, x, qweight, scales, zeros, group_size, bits)


GEMV_CASES = [  # (m, k, n, group_size, bits, dtype, (BLOCK_N, BLOCK_KP, SPLIT_K, warps, stages, REDUCE))
    (1, 96, 40, 32, 4, torch.float16, (16, 4, 1, 4, 1, False)),  # group spans one K tile
    (1, 160, 40, 32, 4, torch.float16, (16, 8, 1, 4, 1, False)),  # one row, tiles of 2 groups
    (1, 320, 72, 64, 4, torch.bfloat16, (32, 8, 2, 4, 1, False)),  # one row, split-K
    (1, 320, 72, 64, 8, torch.bfloat16, (32, 8, 1, 4, 1, False)),  # groups of 2 tiles, partial last one
    (3, 160, 40, 32, 4, torch.bfloat16, (16, 8, 1, 4, 1, False)),  # tiles of 2 groups (gathered scales)
    (4, 320, 72, 320, 8, torch.float16, (32, 16, 3, 4, 1, False)),  # one group, split-K atomics
    (2, 96, 40, 96, 4, torch.bfloat16, (16, 4, 2, 4, 1, False)),
    # K-splits meeting in the workspace: a partial last column tile, splits that get no K rows (8 splits of
    # 5 tiles), several rows, one group.
    (1, 320, 72, 64, 4, torch.bfloat16, (32, 8, 2, 4, 1, True)),
    (1, 160, 40, 32, 4, torch.float16, (16, 4, 8, 4, 1, True)),
    (3, 320, 72, 320, 8, torch.float16, (32, 16, 3, 4, 1, True)),
    (4, 96, 40, 96, 4, torch.bfloat16, (16, 4, 2, 4, 1, True)),
]


@pytest.mark.parametrize("m,k,n,group_size,bits,dtype,config", GEMV_CASES)
def test_triton_gemv_matches_reference(triton_device, m, k, n, group_size, bits, dtype, config):
    qweight, scales, zeros, _ = random_quantized(k, n, group_size, bits, dtype, triton_device)
    x = torch.randn(m, k, device=triton_device).to(dtype)
    out = quant_gemv_triton(x, qweight, scales, zeros, group_size, bits, config)
    _assert_close_to_reference(out, x, qweight, scales, zeros, group_size, bits)


@pytest.fixture
def fresh_workspace(monkeypatch):
    monkeypatch.setattr(split_k_module, "_split_k_workspace", {})
    return split_k_module._split_k_workspace


SPLIT_GEMMS = [  # (m, k, n, group_size, bits, dtype, (BLOCK_M, BLOCK_N, ...), num_splits)
    (5, 320, 72, 64, 4, torch.bfloat16, (16, 32, 64, 2, 4, 1, False), 2),  # partial last column tile
    (17, 320, 40, 32, 4, torch.float16, (16, 32, 32, 2, 4, 1, True), 4),  # two row tiles, groups = K tile
    (9, 160, 40, 160, 8, torch.float16, (16, 16, 32, 2, 4, 1, False), 8),  # 5 K tiles over 8 splits: some get none
    (33, 96, 24, 32, 4, torch.bfloat16, (32, 16, 32, 2, 4, 1, False), 3),
]


@pytest.mark.parametrize("m,k,n,group_size,bits,dtype,config,num_splits", SPLIT_GEMMS)
def test_split_k_gemm_matches_reference(triton_device, fresh_workspace, m, k, n, group_size, bits, dtype, config,
                                        num_splits):
    qweight, scales, zeros, _ = random_quantized(k, n, group_size, bits, dtype, triton_device)
    x = torch.randn(m, k, device=triton_device).to(dtype)
    out = quant_gemm_triton(x, qweight, scales, zeros, group_size, bits, config, num_splits)
    assert out.dtype == dtype
    _assert_close_to_reference(out, x, qweight, scales, zeros, group_size, bits)
    workspace, arrivals = fresh_workspace[torch.device(triton_device)]
    assert not workspace.any() and not arrivals.any()


def test_split_k_products_leave_their_workspace_zeroed(triton_device, fresh_workspace):
    """The last split of each output tile zeroes the sums it took and its counter: call after call (other
    shapes, the GEMV and the GEMM in between, as a model's layers) gives the reference each time."""
    device = torch.device(triton_device)
    kernels.reserve_split_k_workspace(72, device)
    workspace, arrivals = fresh_workspace[device]
    layers = [random_quantized(k, n, 32, 4, torch.float16, triton_device, seed=seed)
              for seed, (k, n) in enumerate([(192, 72), (96, 40), (192, 72)])]
    for rows in (2, 20, 3):
        for qweight, scales, zeros, _ in layers:
            x = torch.randn(rows, qweight.shape[0] * 8, device=triton_device).half()
            if rows <= kernels.GEMV_MAX_ROWS:
                out = quant_gemv_triton(x, qweight, scales, zeros, 32, 4, (16, 4, 3, 4, 1, True))
            else:
                out = quant_gemm_triton(x, qweight, scales, zeros, 32, 4, (16, 16, 32, 2, 4, 1, False), 3)
            _assert_close_to_reference(out, x, qweight, scales, zeros, 32, 4)
            assert fresh_workspace[device][0] is workspace  # reserved big enough: never replaced
            assert not workspace.any() and not arrivals.any()


def test_split_k_workspace_only_grows_and_is_made_when_missing(fresh_workspace):
    cpu = torch.device("cpu")
    rows = kernels.SPLIT_K_MAX_ROWS
    kernels.reserve_split_k_workspace(64, cpu)
    first = fresh_workspace[cpu]
    assert first[0].numel() == rows * 64 and not first[0].any() and not first[1].any()
    kernels.reserve_split_k_workspace(32, cpu)
    assert fresh_workspace[cpu] is first
    kernels.reserve_split_k_workspace(128, cpu)
    assert fresh_workspace[cpu][0].numel() == rows * 128
    fresh_workspace.clear()  # not reserved (outside a CUDA-graph capture): made on first use
    out, workspace, _, splits = split_k_module.split_output(2, 40, 3, True, torch.zeros(2, 8).half())
    assert splits == split_k_module.MEET_IN_WORKSPACE and workspace.numel() == rows * 40
    assert out.dtype == torch.float16


@pytest.mark.parametrize("m,splits,meet", [(1, 1, True), (2, 3, False), (rows := 129, 3, True)])
def test_split_k_outputs_without_the_workspace(fresh_workspace, m, splits, meet):
    """One split stores its tile; splits told not to meet in the workspace, or with more rows than it holds,
    add into a zeroed fp32 output (cast after)."""
    out, _, _, mode = split_k_module.split_output(m, 40, splits, meet, torch.zeros(m, 8).half())
    if splits == 1:
        assert mode == split_k_module.STORE and out.dtype == torch.float16
    else:
        assert mode == split_k_module.ADD_INTO_OUTPUT and out.dtype == torch.float32 and not out.any()


def test_gemv_without_a_workspace_adds_into_the_output(triton_device, monkeypatch):
    """While a CUDA graph is captured nothing may be allocated: a config meant to meet in a workspace that
    is missing falls back to the splits adding into a zeroed fp32 output."""
    monkeypatch.setattr(split_k_module, "_split_k_workspace", {})
    monkeypatch.setattr(split_k_module, "reserve_split_k_workspace", lambda n, device: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    qweight, scales, zeros, _ = random_quantized(320, 72, 64, 4, torch.bfloat16)
    x = torch.randn(1, 320).bfloat16()
    _, _, _, mode = split_k_module.split_output(1, 72, 2, True, x)
    assert mode == split_k_module.ADD_INTO_OUTPUT


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("m,expected", [(5, ("gemm", (16, 64, 128, 8, 4, 3, False), 6)), (8, ("gemm", (16, 64, 128, 8, 4, 3, False), 6)),
                                        (9, ("dequant",)), (128, ("dequant",)), (129, ("dequant",)),
                                        (20, ("dequant",))])
def test_cuda_dispatch_follows_the_row_plan(monkeypatch, m, expected):
    """Rows past the GEMV take their bucket's choice (the first bucket holding them); past the last bucket the
    table's rule (dequantize from DEQUANT_MIN_ROWS on, when the scratch is reserved)."""
    calls = []
    monkeypatch.setattr(quant_gemm_module, "quant_gemm_triton", lambda *args: calls.append(("gemm",) + args[6:]))
    monkeypatch.setattr(quant_gemm_module, "dequantize_triton",
                        lambda *args: calls.append(("dequant",)) or torch.zeros(64, 16, dtype=torch.bfloat16))
    monkeypatch.setattr(quant_gemm_module, "use_triton", lambda tensor: True)
    monkeypatch.setattr(quant_gemm_module, "_scratch", {})
    kernels.reserve_dequant_scratch(64 * 16, torch.bfloat16, torch.device("cpu"))
    qweight, scales, zeros, _ = random_quantized(64, 16, 32, 4, torch.bfloat16)
    plan = ((8, ((16, 64, 128, 8, 4, 3, False), 6)), (128, "dequant"))
    quant_gemm(torch.randn(m, 64).bfloat16(), qweight, scales, zeros, 32, 4, None, plan)
    assert calls == [expected]


def test_split_k_candidates_fill_the_sms():
    from asyncserve.layers.quantization.packed_int_timing import split_k_candidates
    # 8 rows of the 8B's o_proj on 132 SMs: 64 column tiles of 64 -> 5 splits (2 waves), of 128 -> 9
    assert split_k_candidates(8, 4096, 4096, 128, 132) == [((16, 64, 128, 8, 4, 3, False), 5),
                                                          ((16, 128, 128, 8, 4, 3, False), 9)]
    # 128 rows of gate_up: 2 x 448 (or 2 x 224) tiles already fill them; groups of 32 take K tiles of 64
    assert split_k_candidates(128, 4096, 28672, 32, 132) == [((64, 64, 64, 8, 4, 3, False), 1),
                                                            ((64, 128, 64, 8, 4, 3, False), 1)]
    # short K: at least two K tiles per split
    assert split_k_candidates(16, 512, 256, 128, 132)[0] == ((16, 64, 128, 8, 4, 3, False), 2)


def test_split_k_needs_tiles_a_counter_covers():
    qweight, scales, zeros, _ = random_quantized(64, 16, 32, 4)
    with pytest.raises(ValueError, match="at least 16x16"):
        quant_gemm_triton(torch.randn(2, 64), qweight, scales, zeros, 32, 4, (8, 16, 32, 2, 4, 1, False), 2)


def test_timed_gemv_configs_are_in_the_table():
    assert set(kernels.QUANT_GEMV_TIMED) <= set(kernels.QUANT_GEMV_CONFIGS)
    assert all(len(config) == 6 for config in kernels.QUANT_GEMV_CONFIGS)
    for n in (4096, 28672):
        assert kernels.gemv_table_config(n) in kernels.QUANT_GEMV_TIMED


def test_gemv_refuses_more_rows_than_it_handles():
    qweight, scales, zeros, _ = random_quantized(32, 8, 32, 4)
    x = torch.randn(kernels.GEMV_MAX_ROWS + 1, 32)
    with pytest.raises(ValueError, match="at most"):
        quant_gemv_triton(x, qweight, scales, zeros, 32, 4)


def test_cpu_tensors_take_the_reference(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a Triton kernel ran for CPU tensors")

    monkeypatch.setattr(quant_gemm_module, "quant_gemm_triton", refuse)
    monkeypatch.setattr(quant_gemm_module, "quant_gemv_triton", refuse)
    qweight, scales, zeros, _ = random_quantized(64, 8, 32, 4)
    x = torch.randn(2, 64)
    assert torch.equal(quant_gemm(x, qweight, scales, zeros, 32, 4),
                       quant_gemm_ref(x, qweight, scales, zeros, 32, 4))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("m,kernel", [(1, "quant_gemv_triton"), (4, "quant_gemv_triton"),
                                      (5, "quant_gemm_triton")])
def test_cuda_dispatch_picks_gemv_for_few_rows(monkeypatch, m, kernel):
    calls = []
    for name in ("quant_gemm_triton", "quant_gemv_triton"):
        monkeypatch.setattr(quant_gemm_module, name, lambda *args, name=name: calls.append(name))
    monkeypatch.setattr(quant_gemm_module, "use_triton", lambda tensor: True)
    qweight, scales, zeros, _ = random_quantized(64, 8, 32, 4, torch.bfloat16)
    quant_gemm(torch.randn(m, 64).bfloat16(), qweight, scales, zeros, 32, 4)
    assert calls == [kernel]


@pytest.mark.parametrize("m,group_size,bits,dtype", [(20, 128, 4, torch.bfloat16),
                                                     (2, 64, 8, torch.float16),
                                                     (1, 128, 4, torch.bfloat16)])
def test_default_tiles_match_reference(triton_device, m, group_size, bits, dtype):
    k, n = 320, 72
    qweight, scales, zeros, _ = random_quantized(k, n, group_size, bits, dtype, triton_device)
    x = torch.randn(m, k, device=triton_device).to(dtype)
    triton_op = quant_gemv_triton if m <= kernels.GEMV_MAX_ROWS else quant_gemm_triton
    out = triton_op(x, qweight, scales, zeros, group_size, bits)
    _assert_close_to_reference(out, x, qweight, scales, zeros, group_size, bits)


@pytest.mark.parametrize("k,n,group_size,bits", [(96, 40, 32, 4), (320, 72, 64, 8), (160, 136, 160, 4),
                                                 (192, 24, 96, 4)])
def test_triton_dequantize_matches_reference(triton_device, k, n, group_size, bits):
    """K and N not multiples of the 64x64 tiles; groups smaller than, across and equal to a tile."""
    qweight, scales, zeros, _ = random_quantized(k, n, group_size, bits, torch.float32, triton_device)
    scratch = torch.full((k * n + 5,), float("nan"), device=triton_device)
    weight = dequantize_triton(qweight, scales, zeros, group_size, bits, k, scratch)
    assert weight.shape == (k, n) and weight.data_ptr() == scratch.data_ptr()
    torch.testing.assert_close(weight, dequantize_int_rows(qweight, scales, zeros, group_size, bits, k))
    assert scratch[k * n:].isnan().all()  # nothing written past the weight


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("m,reserved,path", [(47, True, "quant_gemm_triton"), (48, True, "dequantize_triton"),
                                             (512, False, "quant_gemm_triton")])
def test_cuda_dispatch_dequantizes_many_rows_into_the_reserved_scratch(monkeypatch, m, reserved, path):
    calls = []
    for name in ("quant_gemm_triton", "dequantize_triton"):
        real = getattr(quant_gemm_module, name)
        monkeypatch.setattr(quant_gemm_module, name,
                            lambda *args, name=name, real=real: calls.append(name) or real(*args))
    monkeypatch.setattr(quant_gemm_module, "use_triton", lambda tensor: True)
    monkeypatch.setattr(quant_gemm_module, "_scratch", {})
    k, n = 64, 16
    qweight, scales, zeros, _ = random_quantized(k, n, 32, 4, torch.bfloat16)
    if reserved:
        kernels.reserve_dequant_scratch(k * n, torch.bfloat16, torch.device("cpu"))
    x = torch.randn(m, k).bfloat16()
    out = quant_gemm(x, qweight, scales, zeros, 32, 4)
    assert calls == [path]
    _assert_close_to_reference(out, x, qweight, scales, zeros, 32, 4)


def test_scratch_only_grows():
    module = quant_gemm_module
    saved = dict(module._scratch)
    try:
        module._scratch.clear()
        kernels.reserve_dequant_scratch(100, torch.float16, torch.device("cpu"))
        first = module._scratch[(torch.device("cpu"), torch.float16)]
        kernels.reserve_dequant_scratch(50, torch.float16, torch.device("cpu"))
        assert module._scratch[(torch.device("cpu"), torch.float16)] is first
        kernels.reserve_dequant_scratch(200, torch.float16, torch.device("cpu"))
        assert module._scratch[(torch.device("cpu"), torch.float16)].numel() == 200
    finally:
        module._scratch.clear()
        module._scratch.update(saved)
