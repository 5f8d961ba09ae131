"""The single-row matrix-vector path computes the same product as the GEMM path."""
import torch

from asyncserve.layers.linear import Linear, MergedLinear, linear


def test_matvec_path_equals_linear():
    torch.manual_seed(0)
    weight, bias, x = torch.randn(37, 19), torch.randn(37), torch.randn(1, 19)
    assert torch.allclose(linear(x, weight, bias, True), torch.nn.functional.linear(x, weight, bias), atol=1e-5)
    rows = torch.randn(3, 19)  # several rows always take the GEMM
    assert torch.equal(linear(rows, weight, None, True), torch.nn.functional.linear(rows, weight))


def test_merged_linear_loads_shards_in_place():
    layer = MergedLinear(4, {"q": 2, "k": 3}, bias=True)
    layer.load_shard("k", "weight", torch.full((3, 4), 2.0))
    layer.load_shard("q", "bias", torch.tensor([5.0, 6.0]))
    assert torch.equal(layer.weight[2:], torch.full((3, 4), 2.0))
    assert layer.bias[:2].tolist() == [5.0, 6.0]
    layer.use_matvec = True
    x = torch.randn(1, 4)
    assert isinstance(layer, Linear)
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-6)
