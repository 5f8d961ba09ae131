"""What a layer with a fixed-size state per sequence (linear attention, SSMs) promises the runner.

Such a layer keeps no KV in the paged pool: each sequence owns one slot of the runner's state pool
(runner/state_pool.py), and the step's metadata says which (`AttentionMetadata.state_slots`). A slot is
zeroed before a sequence's first token, so the layer always reads a valid state from its slot and
writes the new one back.
"""
from __future__ import annotations

import torch
from torch import nn


class RecurrentStateLayer(nn.Module):
    """Subclasses say the shape and dtype of one sequence's state tensors; the runner binds `state_cache`,
    one [num_slots, *shape] tensor per entry of `state_shapes()`."""

    def __init__(self):
        super().__init__()
        self.state_cache: tuple[torch.Tensor, ...] | None = None
        # The recurrent state's element type, which the runner sets from --mamba-ssm-cache-dtype before it
        # sizes the pool; fp32 until then (a layer built alone, as the layer tests build them).
        self.ssm_state_dtype: torch.dtype = torch.float32

    def state_shapes(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        raise NotImplementedError
