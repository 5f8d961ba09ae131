"""RMSNorm: the reference is Hugging Face's LlamaRMSNorm; Triton agrees with it."""

import pytest
import torch

from asyncserve.kernels import (
    fused_add_rms_norm_ref,
    fused_add_rms_norm_triton,
    rms_norm_ref,
    rms_norm_triton,
)

EPS = 1e-6


def _llama_rms_norm(x, weight, eps):
    """LlamaRMSNorm.forward, written out."""
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_equals_llama_rms_norm_exactly(dtype):
    x = torch.randn(5, 96, dtype=dtype)
    weight = torch.randn(96, dtype=dtype)
    assert torch.equal(rms_norm_ref(x, weight, EPS), _llama_rms_norm(x, weight, EPS))


def test_fused_reference_normalises_the_rounded_sum():
    x, residual = torch.randn(3, 64, dtype=torch.bfloat16), torch.randn(3, 64, dtype=torch.bfloat16)
    weight = torch.randn(64, dtype=torch.bfloat16)
    out, new_residual = fused_add_rms_norm_ref(x, residual, weight, EPS)
    assert torch.equal(new_residual, x + residual)
    assert torch.equal(out, _llama_rms_norm(x + residual, weight, EPS))


@pytest.mark.parametrize("shape", [(7, 200), (2, 3, 1000), (1, 4096)])
def test_triton_matches_reference(triton_device, shape):
    x = torch.randn(shape, device=triton_device)
    weight = torch.randn(shape[-1], device=triton_device)
    out = rms_norm_triton(x, weight, EPS)
    assert out.shape == x.shape
    torch.testing.assert_close(out, rms_norm_ref(x, weight, EPS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(7, 200), (2, 3, 1000)])
def test_fused_triton_matches_reference(triton_device, shape):
    x = torch.randn(shape, device=triton_device)
    residual = torch.randn(shape, device=triton_device)
    weight = torch.randn(shape[-1], device=triton_device)
    x_before, residual_before = x.clone(), residual.clone()
    out, new_residual = fused_add_rms_norm_triton(x, residual, weight, EPS)
    expected_out, expected_residual = fused_add_rms_norm_ref(x, residual, weight, EPS)
    torch.testing.assert_close(new_residual, expected_residual, atol=0, rtol=0)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


def test_triton_reads_rows_through_strides(triton_device):
    wide = torch.randn(6, 300, device=triton_device)
    x = wide[:, :200]  # rows 300 apart
    weight = torch.randn(200, device=triton_device)
    torch.testing.assert_close(rms_norm_triton(x, weight, EPS), rms_norm_ref(x, weight, EPS),
                               atol=1e-5, rtol=1e-5)
