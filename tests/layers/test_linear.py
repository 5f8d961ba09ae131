"""Linear layers: one-row kernels compute the same product; fused projections load shards in place."""
import pytest
import torch

from asyncserve.kernels import HAS_TRITON
from asyncserve.layers.linear import MergedLinear, linear


@pytest.mark.parametrize("kernel", ["mv", pytest.param((8, 512, 4, 4), marks=pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed"))])
def test_one_row_kernels_equal_linear(kernel):
    torch.manual_seed(0)
    weight, bias, x = torch.randn(37, 19), torch.randn(37), torch.randn(1, 19)
    expected = torch.nn.functional.linear(x, weight, bias)
    torch.testing.assert_close(linear(x, weight, bias, kernel), expected, rtol=1e-5, atol=1e-5)
    rows = torch.randn(3, 19)  # several rows always take the GEMM
    assert torch.equal(linear(rows, weight, None, kernel), torch.nn.functional.linear(rows, weight))


def test_merged_linear_loads_shards_in_place():
    layer = MergedLinear(4, {"q": 2, "k": 3}, bias=True)
    layer.weight.weight_loader(layer.weight, torch.full((3, 4), 2.0), "k")
    layer.bias.weight_loader(layer.bias, torch.tensor([5.0, 6.0]), "q")
    assert torch.equal(layer.weight[2:], torch.full((3, 4), 2.0))
    assert layer.bias[:2].tolist() == [5.0, 6.0]


def test_merged_linear_refuses_a_shard_of_the_wrong_size():
    layer = MergedLinear(4, {"q": 2, "k": 3})
    with pytest.raises(ValueError, match="expected 3"):
        layer.weight.weight_loader(layer.weight, torch.zeros(2, 4), "k")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("act_name", ["silu", "gelu_tanh"])
def test_gated_mlp_takes_the_fused_gemv_for_one_row_only(act_name):
    """A down projection whose method chose the activation-fused GEMV computes down(act(gate_up)) for one
    row in that kernel, and every other batch (or another activation) through the activation and the GEMM."""
    from asyncserve.layers.activation import GeluTanhAndMul, SiluAndMul
    from asyncserve.layers.linear import Linear
    torch.manual_seed(1)
    act = {"silu": SiluAndMul(), "gelu_tanh": GeluTanhAndMul()}[act_name]
    other = {"silu": GeluTanhAndMul(), "gelu_tanh": SiluAndMul()}[act_name]
    down = Linear(24, 11, bias=True)
    with torch.no_grad():
        down.weight.copy_(torch.randn(11, 24) / 5)
        down.bias.copy_(torch.randn(11))
    gate_up = torch.randn(1, 48)
    calls = []
    method = down.quant_method
    method.gated_row, method.gated_activation = (8, 512, 4, 4), act_name
    original = method.apply_gated
    method.apply_gated = lambda *a: calls.append(1) or original(*a)
    out = down.forward_activated(act, gate_up)
    assert calls == [1]
    torch.testing.assert_close(out, down(act(gate_up)), rtol=1e-5, atol=1e-5)
    rows = torch.randn(3, 48)
    assert torch.equal(down.forward_activated(act, rows), down(act(rows)))
    assert torch.equal(down.forward_activated(other, gate_up), down(other(gate_up)))
    assert calls == [1]
