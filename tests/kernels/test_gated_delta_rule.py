"""The gated delta rule's references: the chunked form equals the recurrent one on awkward lengths and
across chunk boundaries, a prompt split anywhere continues from the state saved at the split, and both
match transformers' torch fallbacks (Qwen3-Next's), which the model tests compare against."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from asyncserve.kernels.gated_delta_rule import (
    chunk_gated_delta_rule_ref,
    chunk_gated_delta_rule_varlen,
    recurrent_gated_delta_rule_ref,
    recurrent_gated_delta_rule_step,
)


def _inputs(num_seqs: int, length: int, k_heads: int = 2, v_heads: int = 4, k_dim: int = 16, v_dim: int = 8,
            seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q, k = randn(num_seqs, length, k_heads, k_dim), randn(num_seqs, length, k_heads, k_dim)
    v = randn(num_seqs, length, v_heads, v_dim)
    g = -F.softplus(randn(num_seqs, length, v_heads))  # log decays <= 0, as the layer makes them
    beta = randn(num_seqs, length, v_heads).sigmoid()
    state = randn(num_seqs, v_heads, k_dim, v_dim) * 0.3
    return q, k, v, g, beta, state


@pytest.mark.parametrize("length", [1, 7, 63, 64, 65, 130])
def test_chunked_form_equals_recurrent_form(length):
    q, k, v, g, beta, state = _inputs(2, length)
    out_r, final_r = recurrent_gated_delta_rule_ref(q, k, v, g, beta, state)
    out_c, final_c = chunk_gated_delta_rule_ref(q, k, v, g, beta, state)
    torch.testing.assert_close(out_c, out_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final_c, final_r.double(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("split", [1, 37, 64, 100])
def test_a_prompt_split_anywhere_continues_from_the_saved_state(split):
    """Chunked prefill: the second part starts from the state the first part ended with, even when the
    split falls inside a 64-token chunk of the kernel."""
    q, k, v, g, beta, state = _inputs(1, 131)
    whole, whole_final = chunk_gated_delta_rule_ref(q, k, v, g, beta, state)
    parts = [slice(0, split), slice(split, None)]
    first, middle = chunk_gated_delta_rule_ref(*(x[:, parts[0]] for x in (q, k, v, g, beta)), state)
    second, final = chunk_gated_delta_rule_ref(*(x[:, parts[1]] for x in (q, k, v, g, beta)), middle)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, whole_final, rtol=1e-10, atol=1e-10)


def test_varlen_runs_each_sequence_from_its_own_state():
    lengths = [5, 1, 70, 12]
    seqs = [_inputs(1, n, seed=i) for i, n in enumerate(lengths)]
    flat = [torch.cat([s[j][0] for s in seqs]) for j in range(5)]
    states = torch.cat([s[5] for s in seqs])
    cu_seqlens = torch.tensor([0, 5, 6, 76, 88], dtype=torch.int32)
    out, finals = chunk_gated_delta_rule_varlen(*flat, states, cu_seqlens)
    for index, (seq, start, end) in enumerate(zip(seqs, cu_seqlens[:-1], cu_seqlens[1:])):
        expected, final = recurrent_gated_delta_rule_ref(*seq)
        torch.testing.assert_close(out[start:end], expected[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(finals[index], final[0], rtol=1e-10, atol=1e-10)


def test_a_decode_step_is_one_recurrent_token_per_sequence():
    q, k, v, g, beta, state = _inputs(3, 1)
    out, final = recurrent_gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state)
    expected, expected_final = chunk_gated_delta_rule_ref(q, k, v, g, beta, state)
    torch.testing.assert_close(out, expected[:, 0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, expected_final, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("length", [1, 9, 64, 77])
def test_references_match_transformers_torch_fallbacks(length):
    from transformers.models.qwen3_next import modeling_qwen3_next as hf
    q, k, v, g, beta, state = (x.float() for x in _inputs(2, length))
    ours_c, ours_c_final = chunk_gated_delta_rule_ref(q, k, v, g, beta, state)
    hf_c, hf_c_final = hf.torch_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state,
                                                       output_final_state=True, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(ours_c, hf_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_c_final, hf_c_final, rtol=1e-5, atol=1e-5)
    ours_r, ours_r_final = recurrent_gated_delta_rule_ref(q, k, v, g, beta, state)
    hf_r, hf_r_final = hf.torch_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state,
                                                           output_final_state=True, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(ours_r, hf_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_r_final, hf_r_final, rtol=1e-5, atol=1e-5)
