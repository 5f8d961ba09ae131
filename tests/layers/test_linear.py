"""Fused projections load each checkpoint tensor into its own rows."""
import pytest
import torch

from asyncserve.layers.linear import MergedLinear


def test_merged_linear_loads_shards_in_place():
    layer = MergedLinear(4, {"q": 2, "k": 3}, bias=True)
    layer.load_shard("k", "weight", torch.full((3, 4), 2.0))
    layer.load_shard("q", "bias", torch.tensor([5.0, 6.0]))
    assert torch.equal(layer.weight[2:], torch.full((3, 4), 2.0))
    assert layer.bias[:2].tolist() == [5.0, 6.0]


def test_merged_linear_refuses_a_shard_of_the_wrong_size():
    layer = MergedLinear(4, {"q": 2, "k": 3})
    with pytest.raises(ValueError, match="expected 3"):
        layer.load_shard("k", "weight", torch.zeros(2, 4))
