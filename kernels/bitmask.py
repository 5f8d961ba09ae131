"""Grammar masks on the logits: a packed int32 bitmask per constrained row (bit v of word v // 32 set =
token v allowed, xgrammar's and llguidance's layout), applied to every constrained row in one launch."""

import numpy as np
import torch

from ._triton import tl, triton, use_triton

_BLOCK = 1024


def apply_token_bitmask_ref(logits, bitmask, rows):
    """logits [S, V] float (in place); bitmask [R, ceil(V / 32)] int32; rows [R] int64: the logits row
    each bitmask row masks. Disallowed tokens become -inf."""
    if rows.numel() == 0:
        return logits
    vocab = logits.shape[1]
    if bitmask.device.type == "cpu":  # numpy unpacks bits ~100x faster than torch's shifts on the CPU
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")
        allowed = torch.from_numpy(bits[:, :vocab]).bool()
    else:
        shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
        allowed = ((bitmask[:, :, None] >> shifts) & 1).reshape(bitmask.shape[0], -1)[:, :vocab].bool()
    if rows.numel() == logits.shape[0] and bool((rows == torch.arange(len(rows), device=rows.device)).all()):
        return logits.masked_fill_(~allowed.to(logits.device), float("-inf"))  # every row, in order
    logits[rows] = torch.where(allowed.to(logits.device), logits[rows], float("-inf"))
    return logits


@triton.jit
def _apply_bitmask_kernel(logits_ptr, bitmask_ptr, rows_ptr, stride_logits, stride_bitmask, vocab,
                          BLOCK: tl.constexpr):
    # Program (r, b): vocab block b of the logits row that bitmask row r masks.
    r = tl.program_id(0).to(tl.int64)
    tokens = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = tokens < vocab
    row = tl.load(rows_ptr + r)
    words = tl.load(bitmask_ptr + r * stride_bitmask + tokens // 32, mask=in_vocab, other=-1)
    allowed = ((words >> (tokens % 32)) & 1) != 0
    tl.store(logits_ptr + row * stride_logits + tokens, float("-inf"), mask=in_vocab & ~allowed)


def apply_token_bitmask_triton(logits, bitmask, rows):
    """The reference's contract, one kernel launch for all rows."""
    if rows.numel() == 0:
        return logits
    assert logits.stride(1) == 1 and bitmask.is_contiguous() and bitmask.dtype == torch.int32
    vocab = logits.shape[1]
    grid = (rows.numel(), triton.cdiv(vocab, _BLOCK))
    _apply_bitmask_kernel[grid](logits, bitmask, rows, logits.stride(0), bitmask.stride(0), vocab,
                                BLOCK=_BLOCK)
    return logits


def apply_token_bitmask(logits, bitmask, rows):
    if use_triton(logits):
        return apply_token_bitmask_triton(logits, bitmask, rows)
    return apply_token_bitmask_ref(logits, bitmask, rows)
