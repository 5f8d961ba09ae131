"""A step's image work: the vision encoder for the images its prompt chunks first cover, the encoder rows
that replace those chunks' placeholder embeddings, and M-RoPE's [3, T] positions for them.

The encoder runs once per image, at the first chunk that covers any of its tokens (all the step's new
images in one call); each image's output is kept on its sequence until a chunk reaches the image's end,
so a chunk boundary inside an image takes the rest of the same rows. A sequence that is recomputed after
preemption, or whose prefix-cache hit ends inside an image, encodes it again. Steps with no chunk before a
prompt's last image end cost one loop over the batch and nothing else.

For a family whose image tokens attend both ways (Gemma 3; the scheduler then never ends a chunk inside an
image), the step's attention metadata also gets `key_ends`: each image row sees up to its image's end."""
from __future__ import annotations

import torch

from asyncserve.runner.input_batch import ScheduledBatch


def image_step_inputs(batch: ScheduledBatch, model, positions: torch.Tensor, device: torch.device
                      ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
    """(positions: as given, or [3, T] when a chunk lies before its prompt's last image end and the family
    has M-RoPE; (rows, [N, E] embeddings) of the step's image tokens, or None; [T] key ends when images
    are attended both ways and the step holds image rows, or None)."""
    pieces = []       # (sequence, its first row, start, count) of chunks before their last image's end
    to_encode = []    # (sequence, image index, image) whose encoder output is not kept yet
    row0 = 0
    for seq in batch.seqs:
        count, start = len(seq.new_token_ids), seq.start_position
        inputs = seq.multimodal
        if inputs is not None and inputs.images and start < inputs.images[-1].end:
            pieces.append((seq, row0, start, count))
            for index, image in inputs.overlapping(start, start + count):
                if index not in seq.image_embeds:
                    to_encode.append((seq, index, image))
        row0 += count
    if not pieces:
        return positions, None, None
    if to_encode:
        pixels = torch.cat([image.pixel_values for _, _, image in to_encode]).to(device, non_blocking=True)
        encoded = model.embed_images(pixels, [image.grid for _, _, image in to_encode])
        for (seq, index, _), output in zip(to_encode, encoded):
            seq.image_embeds[index] = output
    mrope = pieces[0][0].multimodal.rope_positions is not None  # one family per engine
    if mrope:
        host_positions = torch.empty(3, row0, dtype=torch.int64)
        host_positions[:] = _plain_positions(batch)
    key_ends = None
    if pieces[0][0].multimodal.whole_images:
        key_ends = torch.cat([torch.arange(seq.start_position + 1, seq.start_position + 1 + len(seq.new_token_ids))
                              for seq in batch.seqs])
    rows, embeds = [], []
    for seq, first_row, start, count in pieces:
        inputs = seq.multimodal
        if mrope:
            end = min(start + count, inputs.rope_positions.shape[1])
            host_positions[:, first_row:first_row + end - start] = inputs.rope_positions[:, start:end]
        for index, image in inputs.overlapping(start, start + count):
            low, high = max(start, image.offset), min(start + count, image.end)
            rows.append(torch.arange(first_row + low - start, first_row + high - start))
            embeds.append(seq.image_embeds[index][low - image.offset:high - image.offset])
            if key_ends is not None:
                key_ends[first_row + low - start:first_row + high - start] = image.end
            if high == image.end:  # the image's last rows: its output is not needed again
                del seq.image_embeds[index]
    image_embeds = None
    if rows:
        image_embeds = (torch.cat(rows).to(device, non_blocking=True), torch.cat(embeds))
    if key_ends is not None:
        key_ends = key_ends.to(device, non_blocking=True) if rows else None
    return (host_positions.to(device, non_blocking=True) if mrope else positions), image_embeds, key_ends


def _plain_positions(batch: ScheduledBatch) -> torch.Tensor:
    """[T] each row's sequence position plus its rope delta (what build_model_inputs sent as [T])."""
    return torch.cat([torch.arange(seq.start_position + seq.rope_delta,
                                   seq.start_position + seq.rope_delta + len(seq.new_token_ids))
                      for seq in batch.seqs])
