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
