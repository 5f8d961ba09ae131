"""Fused MoE with quantized experts (int4 / int8 group-wise, FP8 per channel): the grouped GEMM that
dequantizes its B tiles against the reference that dequantizes each routed expert, at awkward sizes
(Triton in its CPU interpreter when there is no GPU)."""

import functools

import pytest
import torch

from asyncserve.kernels import GemmTiles, MoeTiles, QuantExperts, fused_moe, fused_moe_ref, fused_moe_triton
from asyncserve.kernels.int_packing import pack_int_rows


def _int_experts(num_experts, n, k, group_size, bits, gen, dtype) -> QuantExperts:
    """Random codes, zeros and scales, packed per expert in the kernel's layout."""
    groups = k // group_size
    q = torch.randint(0, 1 << bits, (num_experts, k, n), generator=gen)
    scales = (torch.rand(num_experts, groups, n, generator=gen) + 0.5) / (k ** 0.5 * (1 << bits - 1))
    zeros = torch.randint(0, 1 << bits, (num_experts, groups, n), generator=gen).float()
    weight = torch.stack([pack_int_rows(q[e], bits) for e in range(num_experts)])
    return QuantExperts(weight, scales.to(dtype), zeros.to(dtype), group_size, bits)


def _fp8_experts(num_experts, n, k, gen) -> QuantExperts:
    weight = (torch.randn(num_experts, n, k, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scales = (torch.rand(num_experts, n, generator=gen) + 0.5) / (100 * k ** 0.5)
    return QuantExperts(weight, scales, None)


def _inputs(num_tokens, hidden, inter, num_experts, fmt, group_sizes=(32, 32), bits=4, seed=0,
            dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen).to(device, dtype)
    logits = torch.randn(num_tokens, num_experts, generator=gen).to(device, dtype)
    if fmt == "fp8":
        w13, w2 = _fp8_experts(num_experts, 2 * inter, hidden, gen), _fp8_experts(num_experts, hidden, inter, gen)
    else:
        w13 = _int_experts(num_experts, 2 * inter, hidden, group_sizes[0], bits, gen, dtype)
        w2 = _int_experts(num_experts, hidden, inter, group_sizes[1], bits, gen, dtype)
    move = lambda experts: QuantExperts(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in experts))
    return x, move(w13), move(w2), logits


def _dense(experts: QuantExperts) -> torch.Tensor:
    return torch.stack([experts.dequantize(e) for e in range(experts.shape[0])])


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_reference_equals_the_float_reference_on_the_dequantized_weights(fmt):
    x, w13, w2, logits = _inputs(9, 64, 32, 6, fmt, seed=1)
    assert w13.shape == (6, 64, 64) and w2.shape == (6, 64, 32)
    expected = fused_moe_ref(x, _dense(w13), _dense(w2), logits, 2, True)
    assert torch.equal(fused_moe_ref(x, w13, w2, logits, 2, True), expected)


def test_int_dequantization_is_codes_minus_zero_times_scale():
    codes = torch.arange(16).repeat(4, 1).t().contiguous()   # [K=16, N=4]: row k holds code k
    scales = torch.tensor([[0.5, 1.0, 2.0, 4.0]])
    zeros = torch.tensor([[8.0, 0.0, 15.0, 1.0]])
    experts = QuantExperts(pack_int_rows(codes, 4)[None], scales[None], zeros[None], 16, 4)
    expected = ((codes.float() - zeros) * scales).t()
    assert torch.equal(experts.dequantize(0), expected)


def test_fp8_dequantization_scales_each_output_row():
    weight = torch.tensor([[1.0, -2.0], [0.5, 448.0]]).to(torch.float8_e4m3fn)
    experts = QuantExperts(weight[None], torch.tensor([[2.0, 0.25]]), None)
    assert experts.shape == (1, 2, 2)
    assert experts.dequantize(0).tolist() == [[2.0, -4.0], [0.125, 112.0]]


CASES = {  # name -> (num_tokens, hidden, inter, num_experts, top_k, fmt, group sizes (w13, w2), bits)
    "int4-one-token": (1, 64, 32, 5, 2, "int4", (32, 32), 4),
    "int4-odd-tokens-K-past-the-tile": (7, 96, 48, 8, 2, "int4", (32, 16), 4),
    "int4-top8-of-16-idle-experts": (13, 64, 32, 16, 8, "int4", (32, 32), 4),
    "int4-group128-aligned-tiles": (5, 256, 128, 4, 2, "int4", (128, 128), 4),
    "int4-one-group": (3, 64, 40, 4, 2, "int4", (64, 40), 4),
    "int8-group32": (6, 64, 32, 5, 2, "int8", (32, 32), 8),
    "fp8-odd-tokens": (11, 72, 40, 6, 2, "fp8", None, 8),
    "fp8-top8-of-16": (5, 64, 24, 16, 8, "fp8", None, 8),
    "no-tokens": (0, 64, 32, 4, 2, "int4", (32, 32), 4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_quantized_gemm_matches_the_reference(case, triton_device):
    num_tokens, hidden, inter, num_experts, top_k, fmt, groups, bits = CASES[case]
    x, w13, w2, logits = _inputs(num_tokens, hidden, inter, num_experts, fmt, groups, bits, device=triton_device)
    out = fused_moe_triton(x, w13, w2, logits, top_k, renormalize=True)
    assert out.shape == (num_tokens, hidden)
    torch.testing.assert_close(out, fused_moe_ref(x, w13, w2, logits, top_k, True), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_half_precision_activations(fmt, triton_device):
    x, w13, w2, logits = _inputs(6, 64, 32, 4, fmt, dtype=torch.float16, device=triton_device, seed=3)
    out = fused_moe_triton(x, w13, w2, logits, 2, True)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), fused_moe_ref(x, w13, w2, logits, 2, True).float(), rtol=2e-2,
                               atol=2e-2)


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_given_tiles_narrower_than_a_group(fmt, triton_device):
    """BLOCK_K 16 inside 32-wide groups, BLOCK_N 16 over 64 outputs: scales gathered per row of the tile."""
    x, w13, w2, logits = _inputs(9, 64, 32, 4, fmt, device=triton_device, seed=4)
    tiles = MoeTiles(GemmTiles(16, 16, 16, 2, 4, 1), GemmTiles(16, 32, 16, 1, 4, 1))
    torch.testing.assert_close(fused_moe_triton(x, w13, w2, logits, 2, False, tiles),
                               fused_moe_ref(x, w13, w2, logits, 2, False), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_experts_no_token_chose_are_never_read(fmt, triton_device):
    x, w13, w2, logits = _inputs(6, 64, 32, 8, fmt, device=triton_device, seed=2)
    logits[:, 4:] -= 100.0  # experts 4..7 never win
    expected = fused_moe_ref(x, w13, w2, logits, 2, True)
    for experts in (w13, w2):
        experts.scales[4:] = float("nan")
    out = fused_moe_triton(x, w13, w2, logits, 2, True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_dispatcher_takes_the_reference_on_the_cpu():
    x, w13, w2, logits = _inputs(4, 64, 32, 4, "int4", seed=5)
    assert torch.equal(fused_moe(x, w13, w2, logits, 2, False), fused_moe_ref(x, w13, w2, logits, 2, False))


@pytest.mark.parametrize("fmt", ["gptq", "awq", "fp8"])
def test_loaded_experts_run_in_the_fused_kernel(fmt, tiny_model_dir, tmp_path, triton_device):
    """A checkpoint's experts, loaded and repacked, in the layout the fused GEMM reads: its output equals
    the layer's reference on the CPU."""
    from asyncserve.config import EngineConfig
    from asyncserve.engine.resolve_config import resolve_config
    from asyncserve.layers.moe import FusedMoE
    from asyncserve.models.loader import load_model
    from tests.quantized_checkpoints import build_fp8, build_quantized

    source = tiny_model_dir("qwen3_moe")
    build = build_fp8 if fmt == "fp8" else functools.partial(build_quantized, fmt=fmt)
    path, _ = build(source, tmp_path / fmt)
    model = load_model(resolve_config(EngineConfig(path, device="cpu", dtype="float32")))
    layer = next(m for m in model.modules() if isinstance(m, FusedMoE))
    gen = torch.Generator().manual_seed(6)
    x, logits = torch.randn(7, layer.hidden_size, generator=gen), torch.randn(7, layer.num_experts, generator=gen)
    expected = layer(x, logits)
    w13, w2 = (QuantExperts(*(t.to(triton_device) if isinstance(t, torch.Tensor) else t for t in experts))
               for experts in layer.quant_method.experts(layer))
    out = fused_moe_triton(x.to(triton_device), w13, w2, logits.to(triton_device), layer.top_k, layer.renormalize)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-4)
