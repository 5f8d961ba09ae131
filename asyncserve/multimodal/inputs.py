"""What a request's images become before the engine admits it: plain data, built once off the event loop,
handed to the runner once with the sequence (runner/step.py's NewSequence)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ImageInput:
    """One image of a prompt: where its placeholder tokens are and what the vision encoder reads."""

    offset: int                      # index of its first placeholder token in the prompt
    length: int                      # its placeholder tokens (the encoder's output rows)
    grid: tuple[int, int, int]       # (frames, rows, columns) of patches, as the processor made them
    pixel_values: torch.Tensor       # [patches, channels * frames * patch * patch], on the host
    content_hash: int                # 63-bit hash of the decoded pixels: the prefix cache's key for its blocks

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class MultiModalInputs:
    """A prompt's images in prompt order, and (M-RoPE families) its rotary positions up to the last image."""

    images: list[ImageInput]
    rope_positions: torch.Tensor | None = None  # [3, P] int64, P = the last image's end
    rope_delta: int = 0                          # added to the position of every token from P on
    # An image's tokens attend to each other both ways (Gemma 3), so the chunk that computes any of them
    # must hold the rest of them too: the scheduler never ends a prefill chunk inside an image.
    whole_images: bool = False
    num_image_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_image_tokens = sum(image.length for image in self.images)

    def overlapping(self, start: int, end: int) -> list[tuple[int, ImageInput]]:
        """(index, image) of the images with a placeholder token in [start, end)."""
        return [(index, image) for index, image in enumerate(self.images)
                if image.offset < end and image.end > start]

    def chunk_length(self, start: int, count: int) -> int:
        """`count`, or shorter so that the chunk [start, start + count) does not end inside an image when
        images are whole: it stops before the image, or is 0 when it starts inside or at one it cannot
        finish (the caller waits for a step with budget for all of it)."""
        if not self.whole_images:
            return count
        end = start + count
        for image in self.images:
            if image.offset < end < image.end:
                return max(image.offset - start, 0)
        return count

    def block_keys(self, start: int, end: int) -> tuple[int, ...]:
        """The content hashes of the images whose tokens fall in [start, end): joined to a KV block's hash,
        so a block of placeholder tokens is shared only between prompts with the same images there."""
        return tuple(image.content_hash for image in self.images if image.offset < end and image.end > start)
