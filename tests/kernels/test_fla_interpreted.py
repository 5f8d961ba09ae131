"""Our calls into flash-linear-attention (fla-core) against the torch references, on the CPU through Triton's
interpreter: the call sites themselves (argument order, layouts, cu_seqlens, states). fla's fused recurrent
kernel takes per-key and per-value decays in the positions right after g, so a positional beta there gave NaN
on the GPU; these tests catch such a slip without one. The interpreter cannot time autotune configs (it has no
driver), so the autotuned kernels run their first config here. fla's chunked delta rule does not run in the
interpreter at all (its state kernel calls `.to` on a Python int): test_gated_delta_net_gpu.py covers it, and
every form at the real layer shapes and in CUDA graphs."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
import triton.runtime.autotuner
from asyncserve.kernels.causal_conv1d import (
    causal_conv1d_update_fla,
    causal_conv1d_update_ref,
    causal_conv1d_varlen_fla,
    causal_conv1d_varlen_ref,
    fla_conv_ops,
)
from asyncserve.kernels.gated_delta_rule import (
    fla_ops,
    recurrent_gated_delta_rule_step_fla,
    recurrent_gated_delta_rule_step_ref,
)

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreted form; the GPU file "
                       "runs the compiled one"),
    pytest.mark.skipif(fla_ops() is None or fla_conv_ops() is None,
                       reason="fla-core is part of the test extra: pip install -e '.[test]'"),
]


@pytest.fixture(autouse=True)
def _first_autotune_config(monkeypatch):
    run = triton.runtime.autotuner.Autotuner.run

    def first_config(self, *args, **kwargs):
        self.configs = self.configs[:1]
        return run(self, *args, **kwargs)

    monkeypatch.setattr(triton.runtime.autotuner.Autotuner, "run", first_config)


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



def test_short_convolution_calls_match_the_reference():
    lengths, channels, width = [1, 70, 5], 24, 4
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(sum(lengths), channels, generator=gen)
    weight = torch.randn(channels, width, generator=gen) * 0.5
    states = torch.randn(len(lengths), channels, width, generator=gen)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    expected, expected_final = causal_conv1d_varlen_ref(x, weight, states, cu_seqlens)
    for host in (None, cu_seqlens.long()):  # with the runner's host copy of the offsets, and without
        out, final = causal_conv1d_varlen_fla(x, weight, states.clone(), cu_seqlens.long(), host)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(final, expected_final)
    stepped, new_state = causal_conv1d_update_fla(x[:3], weight, states.clone())
    expected_step, expected_state = causal_conv1d_update_ref(x[:3], weight, states)
    torch.testing.assert_close(stepped, expected_step, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_state, expected_state)
