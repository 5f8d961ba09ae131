"""Speculative decoding with an EAGLE-3 head: greedy output is token-exact with plain decoding whatever the
head (a random one, mostly wrong; one that is always right), with requests joining mid-flight, prefix-cache
hits and preemption; the head's proposals are what a plain-torch EAGLE-3 computes from the transformers
target's hidden states; sampled requests keep the target's distribution."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from asyncserve import LLM, SamplingParams
from asyncserve.testing.tiny_model import build_tiny_checkpoint
from tests.checkpoint_edits import prefer_tokens
from tests.conftest import PROMPTS, assert_pool_clean, generate_joining_mid_flight
from tests.spec_decode.eagle3_heads import constant_head, eagle3_config, random_head
from tests.spec_decode.helpers import counters, generate_ids, two_sample_chi_square
from tests.spec_decode.test_spec_greedy_exact import REPEATING, assert_blocks_consistent, run_checking_blocks

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="session")
def random_heads(tiny_model_dir, tmp_path_factory):
    """family -> a random head for its tiny target."""
    root = tmp_path_factory.mktemp("eagle3")
    made = {}

    def get(family: str) -> str:
        if family not in made:
            made[family] = random_head(root / family, tiny_model_dir(family))
        return made[family]

    return get


def _eagle_llm(make_llm, family, head, num_tokens=3, extra=None, **kwargs):
    return make_llm(family, speculative_config=eagle3_config(head, num_tokens, **(extra or {})), **kwargs)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_random_head_is_token_exact(family, make_llm, random_heads):
    expected = generate_ids(make_llm(family), PROMPTS, GREEDY)
    llm = _eagle_llm(make_llm, family, random_heads(family))
    assert generate_ids(llm, PROMPTS, GREEDY) == expected
    stats = counters(llm.llm_engine)
    assert stats["spec_decode_num_draft_tokens"] > 100
    assert llm.llm_engine.executor.runner.drafter.num_forwards > 0
    llm.llm_engine.block_pool.check_invariants([])


def test_requests_joining_mid_flight_are_token_exact(make_llm, random_heads):
    params = SamplingParams(temperature=0.0, max_tokens=40, frequency_penalty=-1.0)
    prompts = REPEATING + PROMPTS[:3]
    expected = generate_ids(make_llm("llama"), prompts, params)
    llm = _eagle_llm(make_llm, "llama", random_heads("llama"), max_num_batched_tokens=32, max_num_seqs=4)
    engine = llm.llm_engine
    results = generate_joining_mid_flight(engine, prompts, params, after_step=lambda: assert_blocks_consistent(engine))
    assert results == expected
    assert counters(engine)["spec_decode_num_draft_tokens"] > 50


def test_prefix_cache_hits_are_token_exact(make_llm, random_heads):
    expected = generate_ids(make_llm("llama", enable_prefix_caching=False), REPEATING, GREEDY)
    llm = _eagle_llm(make_llm, "llama", random_heads("llama"))
    engine = llm.llm_engine
    assert generate_ids(llm, REPEATING, GREEDY) == expected
    hits_before = engine.block_pool.num_cache_hits
    assert generate_ids(llm, REPEATING, GREEDY) == expected
    assert engine.block_pool.num_cache_hits > hits_before


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_preemption_is_token_exact(preemption_mode, make_llm, random_heads):
    """Swapped blocks carry the head's KV and the kept hidden states with the target's."""
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    expected = generate_ids(make_llm("llama", max_model_len=96), REPEATING, params)
    llm = _eagle_llm(make_llm, "llama", random_heads("llama"), block_size=8, num_gpu_blocks_override=24,
                     max_model_len=96, preemption_mode=preemption_mode, swap_space=0.01)
    engine = llm.llm_engine
    assert run_checking_blocks(engine, REPEATING, params) == expected
    assert engine.scheduler.num_preemptions > 0


def test_a_head_that_is_always_right_has_every_proposal_accepted(make_llm, tiny_model_dir, tmp_path):
    """A target that always picks token 77 and a head whose d2t maps its argmax to 77: each verify of 3
    drafts emits 4 tokens, 1 (prompt) + 4 * 5 + 3 (2 drafts, capped by max_tokens) = 24."""
    target = prefer_tokens(tiny_model_dir("llama"), tmp_path / "target", {77: 100.0})
    head = constant_head(tmp_path / "head", target, 77)
    plain = LLM(target, device="cpu", num_gpu_blocks_override=512)
    expected = generate_ids(plain, PROMPTS, GREEDY)
    assert {token for ids in expected for token in ids} == {77}
    llm = LLM(target, device="cpu", num_gpu_blocks_override=512, speculative_config=eagle3_config(head, 3))
    assert generate_ids(llm, PROMPTS, GREEDY) == expected
    stats = counters(llm.llm_engine)
    assert stats["spec_decode_num_drafts"] == 6 * len(PROMPTS)
    assert stats["spec_decode_num_accepted_tokens"] == stats["spec_decode_num_draft_tokens"] == 17 * len(PROMPTS)
    assert_pool_clean(llm.llm_engine)


def test_sampled_tokens_keep_the_targets_distribution(make_llm, tiny_model_dir, tmp_path):
    """As with a draft model: many unseeded samples of the first three tokens (top_k=2) with and without a
    head that always proposes the greedy second token, which the rule accepts with probability p(x)."""
    params = SamplingParams(temperature=1.0, top_k=2, max_tokens=3, ignore_eos=True)
    prompts = [PROMPTS[1]] * 500
    greedy = generate_ids(make_llm("llama"), prompts[:1], SamplingParams(temperature=0.0, max_tokens=3))[0]
    head = constant_head(tmp_path / "head", tiny_model_dir("llama"), greedy[1])
    torch.manual_seed(0)
    plain = [tuple(t) for t in generate_ids(make_llm("llama", max_num_seqs=512), prompts, params)]
    llm = _eagle_llm(make_llm, "llama", head, num_tokens=2, extra={"disable_by_batch_size": 1024},
                     max_num_seqs=512)
    torch.manual_seed(1)
    speculative = [tuple(t) for t in generate_ids(llm, prompts, params)]
    statistic, degrees = two_sample_chi_square(plain, speculative)
    assert degrees <= 7
    assert statistic < 30, (statistic, degrees)  # P(chi2(7) > 30) < 1e-4
    stats = counters(llm.llm_engine)
    assert 0 < stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"], stats


def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x, positions, theta):
    """x [T, heads, D], the rotate-half convention of Llama checkpoints."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (torch.arange(half, dtype=torch.float32) / half)
    angles = positions[:, None].float() * inv_freq[None]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def _reference_proposals(head: dict, embed, aux, tokens: list[int], num_drafts: int, config) -> list[int]:
    """EAGLE-3 at test time, recomputed from scratch: row p reads token p + 1 and fc(aux hidden states at p);
    each further draft appends a row reading the last draft and the last row's pre-norm output."""
    heads, kv_heads, head_dim, eps = 4, 2, 16, config["rms_norm_eps"]
    fused = torch.cat(aux, dim=-1) @ head["fc.weight"].T               # [L, E]
    rows_tokens, rows_hidden = list(tokens[1:]), list(fused[:len(tokens) - 1])
    drafts = []
    for _ in range(num_drafts):
        count = len(rows_tokens)
        hidden = torch.stack(rows_hidden)
        positions = torch.arange(count)
        x = torch.cat([_rms(embed[torch.tensor(rows_tokens)], head["midlayer.input_layernorm.weight"], eps),
                       _rms(hidden, head["midlayer.hidden_norm.weight"], eps)], dim=-1)   # [T, 2E]
        q = _rope((x @ head["midlayer.self_attn.q_proj.weight"].T).view(count, heads, head_dim), positions,
                  config["rope_theta"])
        k = _rope((x @ head["midlayer.self_attn.k_proj.weight"].T).view(count, kv_heads, head_dim), positions,
                  config["rope_theta"]).repeat_interleave(heads // kv_heads, dim=1)
        v = (x @ head["midlayer.self_attn.v_proj.weight"].T).view(count, kv_heads, head_dim).repeat_interleave(
            heads // kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / head_dim ** 0.5
        scores = scores.masked_fill(torch.ones(count, count).triu(1).bool(), float("-inf"))
        attended = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(count, -1)
        residual = hidden + attended @ head["midlayer.self_attn.o_proj.weight"].T
        mlp_in = _rms(residual, head["midlayer.post_attention_layernorm.weight"], eps)
        gate, up = mlp_in @ head["midlayer.mlp.gate_proj.weight"].T, mlp_in @ head["midlayer.mlp.up_proj.weight"].T
        prenorm = residual + (torch.nn.functional.silu(gate) * up) @ head["midlayer.mlp.down_proj.weight"].T
        draft_id = int((_rms(prenorm[-1], head["norm.weight"], eps) @ head["lm_head.weight"].T).argmax())
        drafts.append(draft_id + int(head["d2t"][draft_id]))
        rows_tokens.append(drafts[-1])
        rows_hidden.append(prenorm[-1])
    return drafts


def test_proposals_match_a_plain_torch_eagle3_over_the_transformers_targets_hidden_states(tmp_path):
    """A 4-layer target, the hidden states entering layers 0, 1 and 3 (what transformers' hidden_states
    hold at those indices): every verify step's proposals are the reference's for the tokens so far."""
    import json

    from transformers import AutoModelForCausalLM
    target = build_tiny_checkpoint(tmp_path / "target", "llama", num_hidden_layers=4)
    head_path = random_head(tmp_path / "head", target, aux_layer_ids=[0, 1, 3])
    llm = LLM(target, device="cpu", num_gpu_blocks_override=512, speculative_config=eagle3_config(head_path, 3))
    drafter = llm.llm_engine.executor.runner.drafter
    records = []
    run = drafter.run

    def recording(batch):
        proposals = run(batch)
        if proposals is not None:
            (seq,) = [seq for seq in batch.seqs if seq.draft_token_ids]
            records.append((list(seq.token_ids), proposals.tolist()))
        return proposals

    drafter.run = recording
    llm.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert len(records) >= 4
    reference = AutoModelForCausalLM.from_pretrained(target, torch_dtype=torch.float32).eval()
    head = load_file(f"{head_path}/model.safetensors")
    with open(f"{head_path}/config.json") as f:
        config = json.load(f)
    embed = reference.model.embed_tokens.weight.detach()
    for tokens, proposals in records:
        with torch.no_grad():
            states = reference(torch.tensor([tokens]), output_hidden_states=True).hidden_states
        aux = [states[i][0] for i in (0, 1, 3)]
        with torch.no_grad():
            assert proposals == _reference_proposals(head, embed, aux, tokens, len(proposals), config)
