"""The KV pool tensors and how many blocks fit in the memory we are allowed to use."""
from __future__ import annotations

import torch


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> int:
    """K and V of every layer for `block_size` tokens."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element_size


def model_block_bytes(model, block_size: int, dtype: torch.dtype) -> int:
    """One block's bytes for the attention layers of `model`."""
    attention = model.attention_layers()
    return bytes_per_block(len(attention), block_size, attention[0].num_kv_heads, attention[0].head_dim, dtype)


class KVPool:
    """One K and one V tensor per layer, each [num_blocks, block_size, num_kv_heads, head_dim]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (2, num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        # Zeroed, not empty: kernels may load whole blocks, and 0 * NaN garbage would be NaN.
        self.storage = torch.zeros(shape, dtype=dtype, device=device)
        self.host_storage: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int, dtype: torch.dtype,
                  device: torch.device) -> "KVPool":
        """A pool for `model`'s attention layers, each layer bound to its part."""
        attention = model.attention_layers()
        pool = cls(len(attention), num_blocks, block_size, attention[0].num_kv_heads, attention[0].head_dim,
                   dtype, device)
        for layer, cache in zip(attention, pool.layer_caches()):
            layer.kv_cache = cache
        return pool

    def allocate_swap_space(self, num_blocks: int) -> None:
        """Host memory for preempted sequences' blocks (pinned, so copies overlap with compute)."""
        shape = (*self.storage.shape[:2], num_blocks, *self.storage.shape[3:])
        pin = self.storage.device.type == "cuda"
        self.host_storage = torch.zeros(shape, dtype=self.storage.dtype, pin_memory=pin)

    def swap_out(self, moves: list[tuple[int, int]]) -> None:
        device_ids = torch.tensor([d for d, _ in moves], dtype=torch.int64, device=self.storage.device)
        host_ids = torch.tensor([h for _, h in moves], dtype=torch.int64)
        self.host_storage[:, :, host_ids] = self.storage[:, :, device_ids].cpu()

    def swap_in(self, moves: list[tuple[int, int]]) -> None:
        host_ids = torch.tensor([h for h, _ in moves], dtype=torch.int64)
        device_ids = torch.tensor([d for _, d in moves], dtype=torch.int64, device=self.storage.device)
        blocks = self.host_storage[:, :, host_ids].to(self.storage.device, non_blocking=True)
        self.storage[:, :, device_ids] = blocks

    def layer_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.storage[0, layer], self.storage[1, layer]) for layer in range(self.storage.shape[1])]

    def apply_block_moves(self, batch) -> None:
        """A step's swaps and copy-on-write copies (the scheduler's, for every pool kept at its block ids),
        before the step's forward can overwrite the blocks they read."""
        if batch.swap_out:
            self.swap_out(batch.swap_out)
        if batch.swap_in:
            self.swap_in(batch.swap_in)
        if batch.block_copies:
            self.copy_blocks(batch.block_copies)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write of shared partial blocks, for every layer at once."""
        device = self.storage.device
        src = torch.tensor([s for s, _ in copies], dtype=torch.int64, device=device)
        dst = torch.tensor([d for _, d in copies], dtype=torch.int64, device=device)
        self.storage[:, :, dst] = self.storage[:, :, src]


class HiddenStatePool(KVPool):
    """One [E] row per KV slot at the target's block ids (EAGLE-3: the target's fused hidden states), so
    swaps and copy-on-write move it with the KV. `rows` [num_blocks * block_size + 1, E] is the flat view
    that slots index; its last row takes the writes of slot -1 (padding rows)."""

    def __init__(self, num_blocks: int, block_size: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.rows = torch.zeros(num_blocks * block_size + 1, hidden_size, dtype=dtype, device=device)
        self.storage = self.rows[:-1].view(1, 1, num_blocks, block_size, hidden_size)
        self.host_storage: torch.Tensor | None = None

    def write(self, slot_mapping: torch.Tensor, values: torch.Tensor) -> None:
        """values [T, E] at slot_mapping [T] (-1: nowhere), without a host sync (CUDA graphs capture it)."""
        padding = self.rows.shape[0] - 1
        self.rows[torch.where(slot_mapping < 0, padding, slot_mapping)] = values.to(self.rows.dtype)
