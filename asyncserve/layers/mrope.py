"""Qwen's multimodal rotary (M-RoPE): each token has three positions (time, row, column), and the head's
frequencies are split in three sections, each rotated by one of them: in three runs (Qwen2.5-VL), or
interleaved (Qwen3-VL's `mrope_interleaved`: columns cycle time, row, column until the row and column
sections are used up, the rest rotate by time, as transformers' `recomposition_frequencies`).

A text token's three positions are equal, and then M-RoPE is plain rotary: so the runner passes [T]
positions (shifted by the request's rope delta after its images) for any step without image rows, and
decode steps (CUDA graphs included) never see the difference; a step whose prompt chunk covers image
tokens passes [3, T] positions, and only then are the sections gathered."""
from __future__ import annotations

import torch

from asyncserve.kernels import rotary_embedding
from asyncserve.layers.rotary import RotaryEmbedding


class MRotaryEmbedding(RotaryEmbedding):
    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict,
                 mrope_section: list[int], interleaved: bool = False):
        super().__init__(head_dim, max_position, theta, scaling)
        half = head_dim // 2
        if sum(mrope_section) != half:
            raise ValueError(f"mrope_section {mrope_section} must add up to half the head dim ({half}).")
        # Which of the three positions rotates each column of the cos|sin table.
        if interleaved:
            sections = torch.zeros(half, dtype=torch.int64)
            for axis in (1, 2):
                sections[axis:mrope_section[axis] * 3:3] = axis
        else:
            sections = torch.repeat_interleave(torch.arange(3), torch.tensor(mrope_section))
        self.register_buffer("column_section", torch.cat([sections, sections]), persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        if positions.dim() == 1:
            return super().forward(positions, query, key)
        num_tokens = positions.shape[1]
        table = self.cos_sin_cache[positions]                                  # [3, T, D]
        index = self.column_section[None, None, :].expand(1, num_tokens, -1)
        merged = table.gather(0, index)[0].contiguous()                        # [T, D]: a table of T rows
        rows = torch.arange(num_tokens, device=positions.device)
        return rotary_embedding(rows, query, key, merged, self.is_neox_style)
