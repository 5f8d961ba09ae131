"""The state pool: every recurrent-state layer's per-sequence tensors, one slot per sequence that may run
at once, beside the KV pool (hybrid models; engine/state_slots.py decides which sequence holds which slot).

For each layer and each of its state tensors: one [num_slots + 1, *shape] tensor. The extra last slot
takes the writes of a CUDA graph's padding rows. Slots are zeroed before a sequence's first token, copied
to forks after the step that completes their prompt, and swapped to host memory with the KV.
"""
from __future__ import annotations

import torch

from asyncserve.layers.recurrent_state import RecurrentStateLayer


def state_bytes_per_slot(layers: list[RecurrentStateLayer]) -> int:
    """Bytes of one sequence's state, every layer."""
    return sum(torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
               for layer in layers for shape, dtype in layer.state_shapes())


def _index(slots: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(slots, dtype=torch.int64).to(device, non_blocking=True)


class StatePool:
    def __init__(self, layers: list[RecurrentStateLayer], num_slots: int, device: torch.device):
        self.num_slots = num_slots
        self.padding_slot = num_slots  # where a captured decode graph's padding rows write
        self.tensors: list[torch.Tensor] = []
        for layer in layers:
            caches = tuple(torch.zeros((num_slots + 1, *shape), dtype=dtype, device=device)
                           for shape, dtype in layer.state_shapes())
            layer.state_cache = caches
            self.tensors.extend(caches)
        self.host_tensors: list[torch.Tensor] = []

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def allocate_swap_space(self, num_host_slots: int) -> None:
        """Host memory for swapped-out sequences' states (pinned on CUDA, so copies overlap compute)."""
        pin = self.device.type == "cuda"
        self.host_tensors = [torch.zeros((num_host_slots, *t.shape[1:]), dtype=t.dtype, pin_memory=pin)
                             for t in self.tensors]

    def reset(self, slots: list[int]) -> None:
        """Zeros: the state before a sequence's first token (a fresh prompt, or one recomputed)."""
        index = _index(slots, self.device)
        for tensor in self.tensors:
            tensor.index_fill_(0, index, 0)

    def copy(self, moves: list[tuple[int, int]]) -> None:
        """(source slot, target slot) pairs: a fork starts from its parent's state."""
        sources, targets = _index([s for s, _ in moves], self.device), _index([t for _, t in moves], self.device)
        for tensor in self.tensors:
            tensor.index_copy_(0, targets, tensor.index_select(0, sources))

    def swap_out(self, moves: list[tuple[int, int]]) -> None:
        device_slots = _index([d for d, _ in moves], self.device)
        host_slots = torch.tensor([h for _, h in moves], dtype=torch.int64)
        for tensor, host in zip(self.tensors, self.host_tensors):
            host[host_slots] = tensor.index_select(0, device_slots).cpu()

    def swap_in(self, moves: list[tuple[int, int]]) -> None:
        host_slots = torch.tensor([h for h, _ in moves], dtype=torch.int64)
        device_slots = _index([d for _, d in moves], self.device)
        for tensor, host in zip(self.tensors, self.host_tensors):
            tensor.index_copy_(0, device_slots, host[host_slots].to(self.device, non_blocking=True))
