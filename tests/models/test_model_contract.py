"""The model contract (models/base.py): a family that implements only `CausalLM` and a checkpoint-name
mapping is loaded by the generic loader and served by the runner, through the engine."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from asyncserve import LLM, SamplingParams
from asyncserve.layers.attention import AttentionMetadata, PagedAttention
from asyncserve.layers.linear import Linear, MergedLinear
from asyncserve.models.base import CausalLM
from asyncserve.models.registry import register_model
from asyncserve.engine.resolve_config import resolve_config
from tests.checkpoint_edits import copy_checkpoint

WIDTH = 4


class ToySumForCausalLM(CausalLM):
    """Next token = (sum of every token so far) mod V: right only if every earlier token's KV, from
    every earlier step, is read back from the paged pool."""

    packed_modules_mapping = {"kv_proj": ("k_proj", "v_proj")}

    def __init__(self, config, quant_config=None):
        super().__init__()
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, WIDTH)       # row i: [i, 1, 0, 0]
        self.kv_proj = MergedLinear(WIDTH, {"k_proj": WIDTH, "v_proj": WIDTH}, quant_config=quant_config,
                                    prefix="kv_proj")
        self.attn = PagedAttention(1, 1, WIDTH, scale=1.0)
        self.tie_word_embeddings = False
        self.lm_head = Linear(WIDTH, config.vocab_size, quant_config=quant_config, prefix="lm_head")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata):
        hidden = self.embed_tokens(input_ids)                             # [T, 4]
        key, value = self.kv_proj(hidden).split([WIDTH, WIDTH], dim=-1)
        # A zero query weighs every token of the context alike: the mean of [id, 1, 0, 0].
        mean = self.attn(torch.zeros_like(key), key, value, meta)
        total = torch.round(mean[:, 0] * (positions + 1)) % self.vocab_size
        return torch.stack([total, torch.ones_like(total), torch.zeros_like(total),
                            torch.zeros_like(total)], dim=-1)             # [T, 4]: [s, 1, 0, 0]

    def attention_layers(self) -> list[PagedAttention]:
        return [self.attn]


register_model("ToySumForCausalLM", ToySumForCausalLM)


def _toy_weights(vocab_size: int) -> dict[str, torch.Tensor]:
    ids = torch.arange(vocab_size, dtype=torch.float32)
    embed = torch.zeros(vocab_size, WIDTH)
    embed[:, 0], embed[:, 1] = ids, 1.0
    lm_head = torch.zeros(vocab_size, WIDTH)
    lm_head[:, 0], lm_head[:, 1] = 2 * ids, -ids ** 2  # logit_j = 2js - j^2 peaks at j = s
    return {"model.embed_tokens.weight": embed, "model.k_proj.weight": torch.zeros(WIDTH, WIDTH),
            "model.v_proj.weight": torch.eye(WIDTH), "lm_head.weight": lm_head}


@pytest.fixture(scope="module")
def toy_dir(tiny_model_dir, tmp_path_factory):
    source = tiny_model_dir("qwen3")
    return copy_checkpoint(source, tmp_path_factory.mktemp("toy") / "toy",
                           {"architectures": ["ToySumForCausalLM"]}, _toy_weights(768))


def _expected(prompt: list[int], max_tokens: int, vocab_size: int = 768) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(sum(tokens) % vocab_size)
    return tokens[len(prompt):]


def test_a_toy_family_runs_through_the_runner(toy_dir):
    # Small blocks and token budget: prompts are prefilled in chunks, mixed with other sequences' decodes.
    llm = LLM(toy_dir, device="cpu", num_gpu_blocks_override=64, block_size=8, max_model_len=256,
              max_num_batched_tokens=16)
    prompts = [[5, 700, 13], list(range(100, 130)), [767]]
    outputs = llm.generate([{"prompt_token_ids": prompt} for prompt in prompts],
                           SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert [list(out.outputs[0].token_ids) for out in outputs] == [_expected(p, 20) for p in prompts]


class LongContextRuleForCausalLM(ToySumForCausalLM):
    """A family whose KV changes past 40 tokens: the rule is its class's, nothing else names it."""

    @classmethod
    def kv_recompute_length(cls, hf_config, max_model_len):
        return 40


register_model("LongContextRuleForCausalLM", LongContextRuleForCausalLM)


def test_a_familys_own_rule_reaches_the_scheduler_through_the_registry(toy_dir, tmp_path):
    from asyncserve import EngineConfig
    ruled = copy_checkpoint(toy_dir, tmp_path / "ruled", {"architectures": ["LongContextRuleForCausalLM"]})
    assert resolve_config(EngineConfig(ruled, device="cpu")).scheduler.recompute_kv_at == 40
    assert resolve_config(EngineConfig(toy_dir, device="cpu")).scheduler.recompute_kv_at is None


def test_a_new_family_is_its_model_file_alone(tmp_path, monkeypatch, tiny_model_dir):
    """A file in the models package declaring a CausalLM is found by the registry, nothing else edited;
    the skeleton (LM head, attention layers) is the base class's."""
    import asyncserve.models as package
    from asyncserve.models import registry
    (tmp_path / "toy_dense.py").write_text(
        "from asyncserve.models.llama import LlamaForCausalLM\n\n\n"
        "class ToyDenseForCausalLM(LlamaForCausalLM):\n    pass\n")
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "_found", None)
    source = tiny_model_dir("llama")
    toy = copy_checkpoint(source, tmp_path / "toy", {"architectures": ["ToyDenseForCausalLM"]})
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outputs = [LLM(path, device="cpu", num_gpu_blocks_override=64, max_model_len=256).generate(
        "Hello, my name is", params, use_tqdm=False)[0].outputs[0].token_ids for path in (toy, source)]
    assert outputs[0] == outputs[1]
    assert "ToyDenseForCausalLM" in registry.supported_architectures()
