"""Our call into flash-linear-attention's (fla-core) fused recurrent kernel against the torch reference, on
the CPU through Triton's interpreter: the call site itself (argument order, layouts, states). That kernel
takes per-key and per-value decays in the positions right after g, so a positional beta there gave NaN on
the GPU; this test catches such a slip without one. fla's chunked and convolution kernels are autotuned,
which Triton's interpreter cannot run (no driver to time configs): test_gated_delta_net_gpu.py covers them,
and every form at the real layer shapes and in CUDA graphs."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from asyncserve.kernels.gated_delta_rule import (
    fla_ops,
    recurrent_gated_delta_rule_step_fla,
    recurrent_gated_delta_rule_step_ref,
)

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreted form; the GPU file "
                       "runs the compiled one"),
    pytest.mark.skipif(fla_ops() is None,
                       reason="fla-core is part of the test extra: pip install -e '.[test]'"),
]

def _rule_inputs(num_tokens, num_seqs, k_heads=2, v_heads=4, k_dim=16, v_dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=gen)

    q, k = randn(num_tokens, k_heads, k_dim), randn(num_tokens, k_heads, k_dim)
    v = randn(num_tokens, v_heads, v_dim)
    g = -F.softplus(randn(num_tokens, v_heads))
    beta = randn(num_tokens, v_heads).sigmoid()
    states = randn(num_seqs, v_heads, k_dim, v_dim) * 0.1
    return q, k, v, g, beta, states


def test_recurrent_step_call_matches_the_reference():
    q, k, v, g, beta, states = _rule_inputs(3, 3, seed=1)
    out, final = recurrent_gated_delta_rule_step_fla(q, k, v, g, beta, states.clone())
    expected, expected_final = recurrent_gated_delta_rule_step_ref(q, k, v, g, beta, states)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final, expected_final, atol=1e-4, rtol=1e-4)

