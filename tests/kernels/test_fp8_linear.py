"""FP8 linear kernels: the one-row GEMV and the row quantizer against their torch references on awkward
sizes (CPU interpreter or GPU), the dispatcher's choices, and Llama-3.1-8B shapes on a GPU."""

import importlib

import pytest
import torch

from asyncserve.kernels.fp8_linear import (FP8_GEMV_CONFIGS, fp8_gemv_triton, fp8_linear,
                                           fp8_linear_ref, quantize_rows_fp8_ref,
                                           quantize_rows_fp8_triton)

fp8_module = importlib.import_module("asyncserve.kernels.fp8_linear")
FP8 = torch.float8_e4m3fn


def _weights(n, k, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n, k, generator=gen) * 0.5).to(FP8)
    scale = torch.rand(n, generator=gen) * 0.01 + 0.001
    return weight.to(device), scale.to(device)


@pytest.mark.parametrize("n,k,config", [(40, 300, FP8_GEMV_CONFIGS[0]), (17, 1000, FP8_GEMV_CONFIGS[3]),
                                        (72, 96, (16, 128, 4, 1)), (5, 513, (4, 256, 4, 1))])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_reference(triton_device, n, k, config, with_bias):
    """N not a multiple of BLOCK_N, K not of BLOCK_K (masked tails), and a bias."""
    weight, scale = _weights(n, k, triton_device)
    x = torch.randn(1, k, device=triton_device).bfloat16()
    bias = torch.randn(n, device=triton_device).bfloat16() if with_bias else None
    out = fp8_gemv_triton(x, weight, scale, bias, config)
    expected = fp8_linear_ref(x.float(), weight, scale, None if bias is None else bias.float())
    assert out.dtype == torch.bfloat16 and out.shape == (1, n)
    torch.testing.assert_close(out.float(), expected, atol=2e-2 * expected.abs().max(), rtol=2e-2)


def test_gemv_refuses_more_than_one_row():
    weight, scale = _weights(8, 32, "cpu")
    with pytest.raises(ValueError, match="one row of 32"):
        fp8_gemv_triton(torch.randn(2, 32), weight, scale)


@pytest.mark.parametrize("m,k", [(3, 300), (1, 16), (2, 9000)])  # 9000: two passes over the row
def test_row_quantizer_matches_reference(triton_device, m, k):
    """Rows built from e4m3 values times a power of two, each with an entry at the format's maximum,
    so the expected codes are exact (the CPU interpreter's own float-to-fp8 rounding is not e4m3's)."""
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(m, k, generator=gen).to(FP8).float()
    values[:, k // 2] = 448.0
    x = (values * (2.0 ** torch.arange(-2, m - 2))[:, None]).to(triton_device)
    q, scale = quantize_rows_fp8_triton(x)
    q_ref, scale_ref = quantize_rows_fp8_ref(x)
    assert q.dtype == FP8 and scale.shape == (m, 1)
    torch.testing.assert_close(scale, scale_ref)
    assert torch.equal(q.float(), q_ref.float())


def test_cpu_takes_the_reference(monkeypatch):
    monkeypatch.setattr(fp8_module, "fp8_gemv_triton", lambda *a: pytest.fail("Triton on the CPU"))
    weight, scale = _weights(16, 32, "cpu")
    x = torch.randn(1, 32)
    assert torch.equal(fp8_linear(x, weight, scale), fp8_linear_ref(x, weight, scale))


@pytest.mark.parametrize("m,dtype,path", [(1, torch.bfloat16, "fp8_gemv_triton"),
                                          (1, torch.float16, "fp8_gemv_triton"),
                                          (7, torch.bfloat16, "fp8_scaled_mm"),
                                          (7, torch.float16, "fp8_linear_ref")])
def test_cuda_dispatch(monkeypatch, m, dtype, path):
    calls = []
    for name in ("fp8_gemv_triton", "fp8_scaled_mm", "fp8_linear_ref"):
        monkeypatch.setattr(fp8_module, name, lambda *args, name=name: calls.append(name))
    monkeypatch.setattr(fp8_module, "use_triton", lambda tensor: True)
    weight, scale = _weights(16, 32, "cpu")
    fp8_linear(torch.randn(m, 32).to(dtype), weight, scale)
    assert calls == [path]


LLAMA_8B = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # (K, N)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("k,n", LLAMA_8B)
def test_real_shapes_on_the_gpu(k, n):
    weight, scale = _weights(n, k, "cuda")
    x = torch.randn(512, k, device="cuda").bfloat16()
    for m in (1, 2, 16, 512):  # the GEMV, then FP8 tensor cores with rows quantized on the fly
        expected = fp8_linear_ref(x[:m].float(), weight, scale)
        out = fp8_linear(x[:m], weight, scale).float()
        assert ((out - expected).norm() / expected.norm()) < (1e-2 if m == 1 else 5e-2)
    q, s = quantize_rows_fp8_triton(x)
    q_ref, s_ref = quantize_rows_fp8_ref(x)
    torch.testing.assert_close(s, s_ref)
    assert torch.equal(q.float(), q_ref.float())
