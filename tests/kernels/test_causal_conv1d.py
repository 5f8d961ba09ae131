"""The short causal convolution's references: a prompt split over steps, or continued by decodes, gives
what one pass over the whole sequence gives, and both match transformers' torch fallbacks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from asyncserve.kernels.causal_conv1d import causal_conv1d_update, causal_conv1d_varlen

WIDTH = 4


def _inputs(length: int, channels: int = 12, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(length, channels, generator=generator, dtype=torch.float64)
    weight = torch.randn(channels, WIDTH, generator=generator, dtype=torch.float64)
    return x, weight


def _whole(x, weight):
    """silu(causal depthwise conv) of one whole sequence, zeros before its start."""
    padded = F.pad(x.t()[None], (WIDTH - 1, 0))
    return F.silu(F.conv1d(padded, weight[:, None], groups=weight.shape[0])[0].t())


@pytest.mark.parametrize("split", [1, 2, 3, 5, 17])
def test_a_prompt_split_over_steps_equals_one_pass(split):
    x, weight = _inputs(20)
    zeros = torch.zeros(1, x.shape[1], WIDTH, dtype=x.dtype)
    first, state = causal_conv1d_varlen(x[:split], weight, zeros, torch.tensor([0, split]))
    second, _ = causal_conv1d_varlen(x[split:], weight, state, torch.tensor([0, 20 - split]))
    torch.testing.assert_close(torch.cat([first, second]), _whole(x, weight), rtol=1e-12, atol=1e-12)


def test_decodes_continue_the_prompts_state():
    x, weight = _inputs(9)
    zeros = torch.zeros(1, x.shape[1], WIDTH, dtype=x.dtype)
    out, state = causal_conv1d_varlen(x[:6], weight, zeros, torch.tensor([0, 6]))
    outs = [out]
    for t in range(6, 9):
        step, state = causal_conv1d_update(x[t:t + 1], weight, state)
        outs.append(step)
    torch.testing.assert_close(torch.cat(outs), _whole(x, weight), rtol=1e-12, atol=1e-12)


def test_varlen_keeps_sequences_apart():
    parts = [_inputs(n, seed=i) for i, n in enumerate([3, 1, 8])]
    weight = parts[0][1]
    x = torch.cat([p[0] for p in parts])
    zeros = torch.zeros(3, x.shape[1], WIDTH, dtype=x.dtype)
    out, finals = causal_conv1d_varlen(x, weight, zeros, torch.tensor([0, 3, 4, 12]))
    expected = torch.cat([_whole(p[0], weight) for p in parts])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(finals[2], x[-WIDTH:].t())  # the last W inputs
    torch.testing.assert_close(finals[1][:, -1], x[3])     # a 1-token sequence: zeros, then its input


def test_references_match_transformers_torch_fallbacks():
    from transformers.models.qwen3_next import modeling_qwen3_next as hf
    x, weight = (t.float() for t in _inputs(10))
    zeros = torch.zeros(1, x.shape[1], WIDTH)
    ours, state = causal_conv1d_varlen(x[:7], weight, zeros, torch.tensor([0, 7]))
    theirs = hf.causal_conv1d_fn(x[:7].t()[None], weight, activation="silu")[0].t()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    hf_state = F.pad(x[:7].t()[None], (WIDTH - 7, 0)) if 7 < WIDTH else x[7 - WIDTH:7].t()[None].clone()
    for t in range(7, 10):
        step, state = causal_conv1d_update(x[t:t + 1], weight, state)
        hf_step = hf.causal_conv1d_update(x[t:t + 1, :, None], hf_state, weight, activation="silu")[:, :, 0]
        torch.testing.assert_close(step, hf_step, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state, hf_state, rtol=0, atol=0)
