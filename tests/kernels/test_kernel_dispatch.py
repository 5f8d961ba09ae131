"""The `op` entry points take the torch reference for CPU tensors, and the package imports
without triton."""

import subprocess
import sys
import textwrap

import pytest
import torch

import asyncserve.kernels as kernels
from asyncserve.kernels import activation, attention, cache, norm, rotary


def _refuse(*args, **kwargs):
    raise AssertionError("a Triton kernel ran for CPU tensors")


@pytest.fixture
def no_triton_kernels(monkeypatch):
    for module, name in [(cache, "write_kv_cache_triton"), (norm, "rms_norm_triton"),
                         (norm, "fused_add_rms_norm_triton"), (rotary, "rotary_embedding_triton"),
                         (activation, "silu_and_mul_triton"),
                         (attention, "paged_attention_triton"),
                         (attention, "paged_decode_attention_triton"),
                         (attention, "paged_prefill_attention_triton")]:
        monkeypatch.setattr(module, name, _refuse)


def test_dispatchers_use_references_for_cpu_tensors(no_triton_kernels, paged):
    x, weight = torch.randn(2, 8), torch.ones(8)
    assert torch.equal(kernels.rms_norm(x, weight, 1e-6), kernels.rms_norm_ref(x, weight, 1e-6))
    out, residual = kernels.fused_add_rms_norm(x, x, weight, 1e-6)
    assert torch.equal(residual, x + x)
    assert torch.equal(kernels.silu_and_mul(x), kernels.silu_and_mul_ref(x))
    cos_sin_cache = torch.randn(4, 8)
    kernels.rotary_embedding(torch.tensor([1, 2]), torch.randn(2, 8), torch.randn(2, 8),
                             cos_sin_cache, True)
    batch = paged.build([3, 9], [1, 1], num_heads=2, num_kv_heads=1, head_dim=8, block_size=8)
    kernels.write_kv_cache(torch.randn(2, 1, 8), torch.randn(2, 1, 8), batch.k_cache,
                           batch.v_cache, torch.tensor([0, -1]))
    expected = kernels.paged_attention_ref(*paged.args(batch))
    assert torch.equal(kernels.paged_attention(*paged.args(batch)), expected)
    assert torch.equal(kernels.paged_prefill_attention(*paged.args(batch)), expected)
    decoded = kernels.paged_decode_attention(batch.query, batch.k_cache, batch.v_cache,
                                             batch.block_tables, batch.seq_lens, batch.scale)
    torch.testing.assert_close(decoded, expected)


def test_package_imports_and_runs_references_without_triton():
    script = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        import asyncserve.kernels as kernels
        assert not kernels.HAS_TRITON
        x = torch.randn(2, 8)
        assert torch.equal(kernels.rms_norm(x, torch.ones(8), 1e-6),
                           kernels.rms_norm_ref(x, torch.ones(8), 1e-6))
        try:
            kernels.rms_norm_triton(x, torch.ones(8), 1e-6)
        except ModuleNotFoundError:
            print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
