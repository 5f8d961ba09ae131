"""Pieces shared by the paged attention kernels: the sliding window's first key and logit
soft-capping (see attention_ref for what they mean)."""

from ._triton import tl, triton


@triton.jit
def first_key(last_position, sliding_window):
    """The first key position a query at `last_position` sees: last_position - W + 1 with a
    window W > 0, else 0."""
    return tl.where(sliding_window > 0, tl.maximum(last_position - sliding_window + 1, 0), 0)


@triton.jit
def soft_cap(scores, cap):
    """cap * tanh(scores / cap), with tanh(x) = 1 - 2 / (exp(2x) + 1): finite at both ends."""
    return cap - 2.0 * cap / (tl.exp(2.0 * scores / cap) + 1.0)
