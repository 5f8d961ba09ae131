"""The state pool's tensors: one slot per sequence for every state tensor of every layer, plus the slot that
a captured decode graph's padding rows write; reset, fork copies and swaps move whole slots."""
from __future__ import annotations

import torch

from asyncserve.layers.recurrent_state import RecurrentStateLayer
from asyncserve.runner.state_pool import StatePool, state_bytes_per_slot


class _Layer(RecurrentStateLayer):
    def state_shapes(self):
        return [((3, 4), torch.float16), ((2, 5, 5), torch.float32)]


def _pool(num_slots: int = 4) -> tuple[StatePool, list[_Layer]]:
    layers = [_Layer(), _Layer()]
    pool = StatePool(layers, num_slots, torch.device("cpu"))
    for index, tensor in enumerate(pool.tensors):
        tensor.copy_(torch.arange(tensor.numel()).reshape(tensor.shape) + 1000 * index)
    return pool, layers


def test_each_layer_is_bound_to_its_own_tensors_with_a_spare_padding_slot():
    pool, layers = _pool(4)
    assert [tuple(t.shape) for t in layers[0].state_cache] == [(5, 3, 4), (5, 2, 5, 5)]
    assert layers[0].state_cache[0].dtype == torch.float16 and pool.padding_slot == 4
    assert layers[0].state_cache[1].data_ptr() != layers[1].state_cache[1].data_ptr()
    assert state_bytes_per_slot(layers) == 2 * (12 * 2 + 50 * 4)


def test_reset_zeros_only_the_given_slots():
    pool, _ = _pool()
    before = [t.clone() for t in pool.tensors]
    pool.reset([1, 3])
    for tensor, old in zip(pool.tensors, before):
        assert not tensor[[1, 3]].any()
        assert torch.equal(tensor[[0, 2, 4]], old[[0, 2, 4]])


def test_fork_copies_give_each_target_its_source_state():
    pool, _ = _pool()
    pool.copy([(2, 0), (2, 3)])
    for tensor in pool.tensors:
        assert torch.equal(tensor[0], tensor[2]) and torch.equal(tensor[3], tensor[2])


def test_a_swapped_out_state_comes_back_into_another_slot():
    pool, _ = _pool()
    pool.allocate_swap_space(2)
    saved = [t[1].clone() for t in pool.tensors]
    pool.swap_out([(1, 1)])
    pool.reset([1])
    pool.swap_in([(1, 3)])
    for tensor, old in zip(pool.tensors, saved):
        assert torch.equal(tensor[3], old) and not tensor[1].any()
