"""Gemma's ops: RMSNorm scaling by (1 + weight) as transformers' Gemma2RMSNorm, and the
GELU-tanh gated MLP activation; Triton agrees with the references."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

from asyncserve.kernels import (
    fused_add_rms_norm_ref,
    fused_add_rms_norm_triton,
    gelu_tanh_and_mul_ref,
    gelu_tanh_and_mul_triton,
    rms_norm_ref,
    rms_norm_triton,
)

EPS = 1e-6


def _gemma_norm(x, weight):
    norm = Gemma2RMSNorm(x.shape[-1], eps=EPS).to(x.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unit_offset_reference_equals_transformers_gemma_norm_exactly(dtype):
    x = torch.randn(5, 96, dtype=dtype) * 3
    weight = (torch.randn(96) * 0.3).to(dtype)
    assert torch.equal(rms_norm_ref(x, weight, EPS, unit_offset=True), _gemma_norm(x, weight))
    residual = torch.randn(5, 96, dtype=dtype)
    out, new_residual = fused_add_rms_norm_ref(x, residual, weight, EPS, unit_offset=True)
    assert torch.equal(new_residual, x + residual)
    assert torch.equal(out, _gemma_norm(x + residual, weight))


@pytest.mark.parametrize("shape", [(7, 200), (2, 3, 1000)])
def test_unit_offset_triton_matches_reference(triton_device, shape):
    x = torch.randn(shape, device=triton_device)
    residual = torch.randn(shape, device=triton_device)
    weight = torch.randn(shape[-1], device=triton_device) * 0.3
    torch.testing.assert_close(rms_norm_triton(x, weight, EPS, unit_offset=True),
                               rms_norm_ref(x, weight, EPS, unit_offset=True), atol=1e-5, rtol=1e-5)
    out, new_residual = fused_add_rms_norm_triton(x, residual, weight, EPS, unit_offset=True)
    expected_out, expected_residual = fused_add_rms_norm_ref(x, residual, weight, EPS, unit_offset=True)
    torch.testing.assert_close(new_residual, expected_residual, atol=0, rtol=0)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)


def test_gelu_tanh_reference_is_transformers_gelu_pytorch_tanh_of_gate_times_up():
    from transformers.activations import ACT2FN
    x = torch.randn(3, 10) * 3
    gate, up = x[:, :5], x[:, 5:]
    assert torch.equal(gelu_tanh_and_mul_ref(x), ACT2FN["gelu_pytorch_tanh"](gate) * up)
    assert not torch.allclose(gelu_tanh_and_mul_ref(x), F.gelu(gate) * up, atol=1e-5)  # not exact GELU


@pytest.mark.parametrize("shape", [(5, 2 * 37), (3, 2 * 1500), (2, 3, 2 * 64)])
def test_gelu_tanh_triton_matches_reference(triton_device, shape):
    x = torch.randn(shape, device=triton_device) * 4
    out = gelu_tanh_and_mul_triton(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    torch.testing.assert_close(out, gelu_tanh_and_mul_ref(x), atol=1e-5, rtol=1e-5)
