"""The one-row product kernel against F.linear, on random inputs of awkward sizes."""
import pytest
import torch

from asyncserve.kernels import GEMV_CONFIGS, HAS_TRITON, gemv_ref, gemv_triton

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.mark.parametrize("config", GEMV_CONFIGS[:2])
@pytest.mark.parametrize("num_rows,k,bias", [(37, 300, True), (64, 1030, False), (5, 17, True)])
def test_gemv_matches_linear(num_rows, k, bias, config):
    torch.manual_seed(num_rows + k)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(1, k, device=device)
    weight = torch.randn(num_rows, k, device=device)
    b = torch.randn(num_rows, device=device) if bias else None
    torch.testing.assert_close(gemv_triton(x, weight, b, config), gemv_ref(x, weight, b), rtol=1e-4, atol=1e-4)
