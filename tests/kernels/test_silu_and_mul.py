"""SwiGLU gate: silu(first half) * second half."""

import pytest
import torch

from asyncserve.kernels import silu_and_mul_ref, silu_and_mul_triton


def test_reference_is_silu_of_gate_times_up():
    x = torch.randn(3, 10)
    gate, up = x[:, :5], x[:, 5:]
    torch.testing.assert_close(silu_and_mul_ref(x), gate * torch.sigmoid(gate) * up)


@pytest.mark.parametrize("shape", [(5, 2 * 37), (3, 2 * 1500), (2, 3, 2 * 64)])
def test_triton_matches_reference(triton_device, shape):
    x = torch.randn(shape, device=triton_device) * 4
    out = silu_and_mul_triton(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    torch.testing.assert_close(out, silu_and_mul_ref(x), atol=1e-5, rtol=1e-5)
