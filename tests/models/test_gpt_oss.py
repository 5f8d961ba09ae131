"""GPT-OSS from both checkpoint layouts (transformers' dequantized experts, and the public MXFP4 one):
weights where transformers has them, then token for token with transformers in fp32 on the CPU: a
batch, requests joining mid-flight with chunked prefill, preemption and recompute in a small pool,
n > 1 forks, and prompt logprobs across the window."""
from __future__ import annotations

import pytest
import torch

from asyncserve import LLM, SamplingParams
from asyncserve.config import EngineConfig
from asyncserve.engine.resolve_config import resolve_config
from asyncserve.errors import ConfigError
from asyncserve.kernels.mxfp4 import dequantize_mxfp4
from asyncserve.models.loader import iterate_weights, load_model
from asyncserve.testing.mxfp4_checkpoint import quantize_mxfp4, write_mxfp4_checkpoint
from tests.checkpoint_edits import copy_checkpoint
from tests.conftest import (
    PROMPTS,
    assert_pool_clean,
    generate_joining_mid_flight,
    hf_greedy,
)

MAX_NEW = 24
WINDOW = 8


@pytest.fixture(scope="module")
def mxfp4_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny GPT-OSS checkpoint in the public layout: experts as MXFP4 blocks and scales."""
    return write_mxfp4_checkpoint(tiny_model_dir("gpt_oss"), tmp_path_factory.mktemp("gpt-oss") / "mxfp4")


def _ours(path: str, **kwargs):
    return load_model(resolve_config(EngineConfig(path, device="cpu", dtype="float32", **kwargs)))


def _expected(hf_reference, prompts, max_new=MAX_NEW):
    model, tokenizer = hf_reference("gpt_oss")
    return [hf_greedy(model, tokenizer.encode(p), max_new) for p in prompts]


def test_packing_is_exact_for_mxfp4_values():
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 2, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(110, 140, (3, 5, 2), generator=gen, dtype=torch.uint8)
    weight = dequantize_mxfp4(blocks, scales, torch.float32)
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(weight), torch.float32), weight)


def test_the_mxfp4_checkpoint_has_the_public_layout(mxfp4_dir):
    shapes = {name: tuple(tensor.shape) for name, tensor in iterate_weights(mxfp4_dir)}
    experts = "model.layers.1.mlp.experts"
    assert shapes[f"{experts}.gate_up_proj_blocks"] == (6, 256, 2, 16)  # [E, 2I, H / 32, 16]
    assert shapes[f"{experts}.gate_up_proj_scales"] == (6, 256, 2)
    assert shapes[f"{experts}.down_proj_blocks"] == (6, 64, 4, 16)      # [E, H, I / 32, 16]
    assert shapes[f"{experts}.gate_up_proj_bias"] == (6, 256)
    assert f"{experts}.gate_up_proj" not in shapes
    assert shapes["model.layers.0.self_attn.sinks"] == (4,)
    assert shapes["model.layers.0.mlp.router.bias"] == (6,)


def test_weights_land_where_transformers_has_them(tiny_model_dir, hf_reference):
    hf, _ = hf_reference("gpt_oss")
    ours = _ours(tiny_model_dir("gpt_oss"))
    inter = hf.config.intermediate_size
    for our_layer, hf_layer in zip(ours.layers, hf.model.layers, strict=True):
        experts, hf_experts = our_layer.mlp.experts, hf_layer.mlp.experts
        # transformers: [E, H, 2I], gate in the even columns; ours: [E, 2I, H], gate rows then up rows
        assert torch.equal(experts.w13_weight[:, :inter], hf_experts.gate_up_proj[:, :, 0::2].transpose(1, 2))
        assert torch.equal(experts.w13_weight[:, inter:], hf_experts.gate_up_proj[:, :, 1::2].transpose(1, 2))
        assert torch.equal(experts.w13_bias[:, :inter], hf_experts.gate_up_proj_bias[:, 0::2])
        assert torch.equal(experts.w13_bias[:, inter:], hf_experts.gate_up_proj_bias[:, 1::2])
        assert torch.equal(experts.w2_weight, hf_experts.down_proj.transpose(1, 2))
        assert torch.equal(experts.w2_bias, hf_experts.down_proj_bias)
        assert torch.equal(our_layer.mlp.router.weight, hf_layer.mlp.router.weight)
        assert torch.equal(our_layer.mlp.router.bias, hf_layer.mlp.router.bias)
        assert torch.equal(our_layer.self_attn.attn.sinks, hf_layer.self_attn.sinks)
        q_bias = our_layer.self_attn.qkv_proj.bias[:our_layer.self_attn.q_size]
        assert torch.equal(q_bias, hf_layer.self_attn.q_proj.bias)
        assert torch.equal(our_layer.self_attn.o_proj.bias, hf_layer.self_attn.o_proj.bias)
        assert experts.activation_options == {"activation": "swigluoai", "swiglu_alpha": 1.702, "swiglu_limit": 3.0}
        assert (experts.top_k, experts.renormalize) == (4, True)


def test_both_layouts_load_the_same_weights(tiny_model_dir, mxfp4_dir):
    dequantized, packed = _ours(tiny_model_dir("gpt_oss")), _ours(mxfp4_dir)
    assert packed.layers[0].mlp.experts.w13_weight.dtype == torch.float32
    for (name, ours), (_, theirs) in zip(packed.named_parameters(), dequantized.named_parameters(), strict=True):
        assert torch.equal(ours, theirs), name


def test_layers_alternate_window_and_full_attention_all_with_sinks(make_llm):
    model = make_llm("gpt_oss").llm_engine.executor.runner.model
    layers = model.attention_layers()
    assert [attention.sliding_window for attention in layers] == [WINDOW, None]
    assert all(attention.sinks is not None and attention.sinks.shape == (4,) for attention in layers)


def test_mxfp4_checkpoint_serves_transformers_tokens_mid_flight(mxfp4_dir, hf_reference):
    """The packed experts, dequantized at load, give transformers' tokens (it reads the dequantized
    checkpoint) while new prompts prefill in chunks beside decodes."""
    llm = LLM(mxfp4_dir, device="cpu", num_gpu_blocks_override=512, max_num_batched_tokens=32, max_num_seqs=4)
    results = generate_joining_mid_flight(llm.llm_engine, PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_NEW))
    assert results == _expected(hf_reference, PROMPTS)
    assert_pool_clean(llm.llm_engine)


def test_preemption_and_recompute_keep_transformers_tokens(make_llm, hf_reference):
    """40 blocks of 8 tokens for six prompts (one of 252 tokens) and 24 more tokens each: sequences are
    preempted, their KV dropped and computed again (in chunks), across the window."""
    llm = make_llm("gpt_oss", num_gpu_blocks_override=40, block_size=8, max_num_batched_tokens=64,
                   max_num_seqs=6, max_model_len=320)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_NEW), use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert [list(o.outputs[0].token_ids) for o in outputs] == _expected(hf_reference, PROMPTS)


def test_forks_of_one_prompt_each_give_transformers_tokens(make_llm, hf_reference):
    """n > 1 forks share the prompt's blocks (copy-on-write of the last one): greedy, every fork is
    transformers' continuation."""
    llm = make_llm("gpt_oss", block_size=8)
    prompt = PROMPTS[5]
    out = llm.generate(prompt, SamplingParams(temperature=0.0, n=3, max_tokens=MAX_NEW), use_tqdm=False)[0]
    expected = _expected(hf_reference, [prompt])[0]
    assert [list(completion.token_ids) for completion in out.outputs] == [expected] * 3


def test_prompt_logprobs_match_transformers_across_the_window(make_llm, hf_reference):
    """Every position of a prompt many windows long, scored in chunks of 16: sinks, the sliding and
    the full layer, YaRN, the experts' clamp all move these numbers."""
    prompt = PROMPTS[4]
    llm = make_llm("gpt_oss", max_num_batched_tokens=16)
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    model, tokenizer = hf_reference("gpt_oss")
    ids = tokenizer.encode(prompt)
    assert len(ids) > 10 * WINDOW
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    ours = [out.prompt_logprobs[position][ids[position]].logprob for position in range(1, len(ids))]
    expected = [reference[position - 1, ids[position]].item() for position in range(1, len(ids))]
    assert ours == pytest.approx(expected, abs=1e-4)


def test_sinks_take_part(tiny_model_dir):
    """Without its sinks (a logit of -inf) the model's logits move: the loaded sinks are used."""
    from asyncserve.layers.attention import AttentionMetadata
    model = _ours(tiny_model_dir("gpt_oss"))
    ids = torch.arange(20, 40)

    def logits() -> torch.Tensor:
        block_size = 16
        k_cache = torch.zeros(4, block_size, 2, 16)
        for attention in model.attention_layers():
            attention.kv_cache = (k_cache.clone(), k_cache.clone())
        meta = AttentionMetadata(slot_mapping=torch.arange(20), block_tables=torch.tensor([[0, 1]], dtype=torch.int32),
                                 seq_lens=torch.tensor([20], dtype=torch.int32),
                                 query_start_loc=torch.tensor([0, 20], dtype=torch.int32), max_query_len=20,
                                 max_seq_len=20)
        with torch.no_grad():
            return model.compute_logits(model(ids, torch.arange(20), meta))

    with_sinks = logits()
    for attention in model.attention_layers():
        attention.sinks.data.fill_(float("-inf"))
    assert not torch.allclose(logits(), with_sinks, atol=1e-3)


def test_unpaired_mxfp4_blocks_are_named(mxfp4_dir, tmp_path):
    weights = dict(iterate_weights(mxfp4_dir))
    del weights["model.layers.1.mlp.experts.down_proj_scales"]
    path = copy_checkpoint(mxfp4_dir, tmp_path / "unpaired", weights=weights)
    with pytest.raises(ConfigError, match=r"layers\.1\.mlp\.experts\.down_proj_blocks"):
        _ours(path)


def test_mxfp4_is_a_checkpoint_format_not_a_method_to_apply(tiny_model_dir):
    with pytest.raises(ConfigError, match="mxfp4"):
        _ours(tiny_model_dir("gpt_oss"), quantization="mxfp4")


def test_quantizing_the_experts_at_load_is_refused(tiny_model_dir):
    with pytest.raises(ConfigError, match="quantized MoE experts"):
        _ours(tiny_model_dir("gpt_oss"), quantization="fp8")
