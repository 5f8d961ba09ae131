"""The one-row product kernel against F.linear, on random inputs of awkward sizes."""
import pytest
import torch
import torch.nn.functional as F

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


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_rows,k,bias", [(37, 300, True), (9, 1030, False)])
def test_gemv_applies_the_gated_activation_to_its_input(num_rows, k, bias, dtype, activation):
    """gate|up [1, 2K] in, down(act(gate) * up) out: the MLP's activation and down projection as one kernel,
    equal to the two kernels it replaces (the activation rounded to the dtype in between)."""
    from asyncserve.kernels import gelu_tanh_and_mul_ref, silu_and_mul_ref
    torch.manual_seed(num_rows + k)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gate_up = torch.randn(1, 2 * k, device=device).to(dtype)
    weight = (torch.randn(num_rows, k, device=device) / k ** 0.5).to(dtype)
    b = torch.randn(num_rows, device=device).to(dtype) if bias else None
    act = {"silu": silu_and_mul_ref, "gelu_tanh": gelu_tanh_and_mul_ref}[activation]
    two_kernels = F.linear(act(gate_up.float()).to(dtype).float(), weight.float(), None if b is None else b.float())
    fused = gemv_triton(gate_up, weight, b, GEMV_CONFIGS[1], activation=activation)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(fused.float(), two_kernels, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(gemv_ref(gate_up, weight, b, activation).float(), two_kernels, rtol=tolerance,
                               atol=tolerance)
    with pytest.raises(AssertionError):  # the plain width is refused: x must be the whole gate|up row
        gemv_triton(gate_up[:, :k].contiguous(), weight, b, GEMV_CONFIGS[1], activation=activation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("num_rows,k,bias,config", [(37, 300, True, GEMV_CONFIGS[1]), (9, 1030, False, GEMV_CONFIGS[0]),
                                                    (20, 64, False, GEMV_CONFIGS[2])])
def test_gemv_normalizes_its_input_row(num_rows, k, bias, config, dtype, with_residual):
    """The layer's RMSNorm (and the residual add before it) inside the next projection's GEMV: the same
    product and the same new residual as the norm kernel followed by the GEMM."""
    from asyncserve.kernels import gemv_normed_ref, gemv_normed_triton
    torch.manual_seed(num_rows * k)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden = torch.randn(1, k, device=device).to(dtype)
    residual = torch.randn(1, k, device=device).to(dtype) if with_residual else None
    norm_weight = (1 + 0.1 * torch.randn(k, device=device)).to(dtype)
    weight = (torch.randn(num_rows, k, device=device) / k ** 0.5).to(dtype)
    b = torch.randn(num_rows, device=device).to(dtype) if bias else None
    out, new_residual = gemv_normed_triton(hidden, residual, norm_weight, 1e-6, weight, b, config)
    expected, expected_residual = gemv_normed_ref(hidden, residual, norm_weight, 1e-6, weight, b)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(out.float(), expected.float(), rtol=tolerance, atol=tolerance)
    assert torch.equal(new_residual, expected_residual)
    if not with_residual:
        assert new_residual is hidden
