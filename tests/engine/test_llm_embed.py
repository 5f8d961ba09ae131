"""Embedding models offline: LLM.embed against sentence-transformers and transformers + manual pooling."""
from __future__ import annotations

import pytest
import torch

from asyncserve import LLM, PoolingParams
from asyncserve.errors import ConfigError, InvalidParameterError, PromptTooLongError
from asyncserve.engine.resolve_config import resolve_config
from tests.conftest import PROMPTS, assert_pool_clean
from tests.embedding_checkpoints import (decoder_body_checkpoint, reference_embedding,
                                         sentence_transformers_checkpoint)

TOLERANCE = 1e-4
MIXED = PROMPTS + ["Short.", "word " * 40, "The capital of France is Paris, and"]


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory):
    """name -> path: Qwen3-Embedding's layout (last token, normalized), a mean-pooled one, the decoder body."""
    root = tmp_path_factory.mktemp("embedding-models")
    qwen3 = tiny_model_dir("qwen3")
    return {
        "last": sentence_transformers_checkpoint(qwen3, root / "last"),
        "mean": sentence_transformers_checkpoint(qwen3, root / "mean", mode="mean_tokens", normalize=False),
        "body": decoder_body_checkpoint(qwen3, root / "body"),
        "matryoshka": sentence_transformers_checkpoint(qwen3, root / "matryoshka",
                                                       matryoshka_dimensions=[16, 32]),
        "generative": qwen3,
    }


@pytest.fixture
def make(checkpoints):
    made = []

    def build(name: str, **kwargs) -> LLM:
        kwargs.setdefault("device", "cpu")
        kwargs.setdefault("num_gpu_blocks_override", 256)
        kwargs.setdefault("max_model_len", 1024)
        llm = LLM(str(checkpoints[name]), **kwargs)
        made.append(llm)
        return llm

    yield build
    for llm in made:  # every block back in the pool: nothing of a pooled prompt's KV is kept
        assert_pool_clean(llm.llm_engine)


def vectors(outputs) -> list[torch.Tensor]:
    return [torch.tensor(output.outputs.embedding) for output in outputs]


def assert_close(actual: list[torch.Tensor], expected, tolerance: float = TOLERANCE) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert got.shape == want.shape
        assert (got - want).abs().max().item() < tolerance


def test_qwen3_embedding_layout_is_served_as_sentence_transformers_encodes_it(make, checkpoints):
    from sentence_transformers import SentenceTransformer
    llm = make("last")
    assert llm.llm_engine.model_config.runner_type == "pooling"  # auto: the checkpoint ships a Pooling module
    outputs = llm.embed(MIXED)
    reference = SentenceTransformer(str(checkpoints["last"]), device="cpu").encode(MIXED, convert_to_tensor=True)
    assert_close(vectors(outputs), list(reference))
    tokenizer = llm.get_tokenizer()
    assert [output.prompt_token_ids for output in outputs] == [tokenizer.encode(text) for text in MIXED]
    assert all(abs(vector.norm().item() - 1.0) < 1e-5 for vector in vectors(outputs))


def test_mean_pooling_checkpoint_matches_sentence_transformers(make, checkpoints):
    from sentence_transformers import SentenceTransformer
    llm = make("mean")
    assert llm.llm_engine.model_config.pooler.pooling_type == "MEAN"
    reference = SentenceTransformer(str(checkpoints["mean"]), device="cpu").encode(MIXED, convert_to_tensor=True)
    assert_close(vectors(llm.embed(MIXED)), list(reference))


@pytest.mark.parametrize("pooling_type,normalize", [("MEAN", True), ("MEAN", False), ("CLS", True),
                                                    ("CLS", False), ("LAST", False)])
def test_pooler_config_pools_as_transformers_plus_manual_pooling(make, checkpoints, pooling_type, normalize):
    llm = make("generative", runner="pooling",
               pooler_config={"pooling_type": pooling_type.lower(), "normalize": normalize})
    outputs = llm.embed(MIXED)
    expected = [reference_embedding(str(checkpoints["generative"]), output.prompt_token_ids, pooling_type,
                                    normalize) for output in outputs]
    assert_close(vectors(outputs), expected)


def test_decoder_body_checkpoint_loads_without_lm_head_and_defaults_to_last_normalized(make, checkpoints):
    llm = make("body")
    config = llm.llm_engine.model_config
    assert config.runner_type == "pooling" and config.hf_config.architectures == ["Qwen3Model"]
    assert llm.llm_engine.executor.model.lm_head is None
    outputs = llm.embed(PROMPTS)
    expected = [reference_embedding(str(checkpoints["body"]), output.prompt_token_ids, "LAST", True)
                for output in outputs]
    assert_close(vectors(outputs), expected)


@pytest.mark.parametrize("pooling_type", ["LAST", "MEAN", "CLS"])
def test_chunked_prefill_and_batching_give_the_vectors_of_one_prompt_alone(make, pooling_type):
    """A budget of 24 tokens a step: long prompts are split over steps, short ones share them."""
    llm = make("generative", runner="pooling", max_num_batched_tokens=24,
               pooler_config={"pooling_type": pooling_type})
    runner = llm.llm_engine.executor.runner
    step_sizes = []
    launch = runner.launch_pooling
    runner.launch_pooling = lambda batch, finished: step_sizes.append(len(batch.seqs)) or launch(batch, finished)
    outputs = llm.embed(MIXED)
    runner.launch_pooling = launch
    assert max(step_sizes) > 1  # prompts shared steps ...
    assert max(len(output.prompt_token_ids) for output in outputs) > 24  # ... and one took several
    together = vectors(outputs)
    alone = [vectors(llm.embed([prompt]))[0] for prompt in MIXED]
    assert_close(together, alone, 1e-5)


def test_pooled_requests_survive_preemption_in_a_small_pool(make):
    """8 blocks of 16 tokens, prompts of 92 tokens in chunks of 48: sequences are preempted and
    recomputed mid-prompt (their carried partial sums dropped), and their vectors do not change."""
    prompts = ["word " * 30 + str(i) for i in range(6)]
    small = make("generative", runner="pooling", num_gpu_blocks_override=8, max_model_len=128,
                 pooler_config={"pooling_type": "MEAN"}, max_num_batched_tokens=48)
    large = make("generative", runner="pooling", pooler_config={"pooling_type": "MEAN"})
    assert_close(vectors(small.embed(prompts)), vectors(large.embed(prompts)), 1e-5)
    assert small.llm_engine.scheduler.num_preemptions > 0


def test_flags_that_ask_for_an_embedding_model(checkpoints):
    from asyncserve.config import EngineConfig
    generative = str(checkpoints["generative"])
    for flags in ({"runner": "pooling"}, {"task": "embed"}, {"task": "embedding"}, {"convert": "embed"}):
        assert resolve_config(EngineConfig(generative, device="cpu", **flags)).model.runner_type == "pooling"
    assert resolve_config(EngineConfig(generative, device="cpu")).model.runner_type == "generate"
    st = str(checkpoints["last"])
    assert resolve_config(EngineConfig(st, device="cpu", runner="generate")).model.runner_type == "generate"
    with pytest.raises(ConfigError, match="runner='pooling'"):
        EngineConfig(generative, runner="generate", convert="embed")
    with pytest.raises(ConfigError, match="runner='pooling'"):
        EngineConfig(generative, runner="generate", task="embed")
    with pytest.raises(ConfigError, match="classify"):
        EngineConfig(generative, task="classify")
    with pytest.raises(ConfigError, match="pooling_type='MAX'"):
        EngineConfig(generative, pooler_config='{"pooling_type": "MAX"}')
    with pytest.raises(ConfigError, match="dimensions"):
        EngineConfig(generative, override_pooler_config={"dimensions": 8})
    config = resolve_config(EngineConfig(generative, device="cpu", runner="pooling",
                          override_pooler_config='{"pooling_type": "CLS"}'))
    assert (config.model.pooler.pooling_type, config.model.pooler.normalize) == ("CLS", True)
    assert not config.cache.enable_prefix_caching  # CLS and MEAN read every prompt token's hidden state


def test_cli_flags_reach_the_engine_config(checkpoints):
    from asyncserve.cli import build_parser, engine_config, parse_args
    parser = build_parser()
    model_path = str(checkpoints["generative"])
    config = engine_config(parse_args(parser, [model_path, "--runner", "pooling", "--convert", "embed",
                                               "--pooler-config", '{"pooling_type": "MEAN", "normalize": false}']))
    assert (config.runner, config.convert, config.pooler_config) == (
        "pooling", "embed", {"pooling_type": "MEAN", "normalize": False})
    old = engine_config(parse_args(parser, [model_path, "--task", "embed",
                                            "--override-pooler-config", '{"pooling_type": "CLS"}']))
    assert (old.task, old.pooler_config) == ("embed", {"pooling_type": "CLS"})
    assert resolve_config(old).model.runner_type == "pooling"


def test_unsupported_sentence_transformers_module_is_refused(checkpoints, tmp_path):
    from asyncserve.config import EngineConfig
    dense = {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}
    path = sentence_transformers_checkpoint(str(checkpoints["generative"]), tmp_path / "dense",
                                            extra_modules=[dense])
    with pytest.raises(ConfigError, match="Dense"):
        resolve_config(EngineConfig(str(path), device="cpu"))


def test_matryoshka_dimensions_truncate_then_normalize(make):
    llm = make("matryoshka")
    full = vectors(llm.embed(PROMPTS, PoolingParams(normalize=False)))
    assert all(abs(vector.norm().item() - 1.0) > 1e-3 for vector in full)  # the request's normalize=False
    assert_close([torch.nn.functional.normalize(vector, dim=-1) for vector in full], vectors(llm.embed(PROMPTS)),
                 1e-5)
    short = vectors(llm.embed(PROMPTS, PoolingParams(dimensions=16)))
    assert_close(short, [torch.nn.functional.normalize(vector[:16], dim=-1) for vector in full], 1e-5)
    with pytest.raises(InvalidParameterError, match=r"\[16, 32\]"):
        llm.embed(PROMPTS[0], PoolingParams(dimensions=20))


def test_dimensions_refused_for_a_model_that_is_not_matryoshka(make):
    with pytest.raises(InvalidParameterError, match="not a Matryoshka model"):
        make("last").embed("hello", PoolingParams(dimensions=16))


def test_length_limit_and_truncation(make):
    llm = make("last", max_model_len=64)
    tokenizer = llm.get_tokenizer()
    ids = tokenizer.encode("word " * 100)
    assert len(ids) > 64
    with pytest.raises(PromptTooLongError, match="max_model_len"):
        llm.embed({"prompt_token_ids": ids})
    exactly = vectors(llm.embed({"prompt_token_ids": ids[-64:]}))  # a whole context is fine: nothing generated
    truncated = llm.embed({"prompt_token_ids": ids}, truncate_prompt_tokens=64)
    assert truncated[0].prompt_token_ids == ids[-64:]
    assert_close(vectors(truncated), exactly, 0.0 + 1e-6)
    with pytest.raises(InvalidParameterError, match="empty"):
        llm.embed({"prompt_token_ids": []})


def test_each_model_kind_refuses_the_other_api(make):
    with pytest.raises(InvalidParameterError, match="LLM.embed"):
        make("last").generate("hello")
    with pytest.raises(InvalidParameterError, match="does not support embeddings"):
        make("generative").embed("hello")


@pytest.mark.parametrize("architecture,expected", [
    ("Qwen3Model", "pooling"), ("LlamaModel", "pooling"), ("Qwen3ForCausalLM", "generate"),
    ("GPT2LMHeadModel", "generate"), ("QWenLMHeadModel", "generate"), ("OPTForCausalLM", "generate"),
])
def test_auto_runner_tells_bodies_from_language_models(architecture, expected, tmp_path):
    """A bare body (…Model) is an embedding model; …LMHeadModel names (GPT-2, Qwen-1) generate."""
    from asyncserve.config.pooling import resolve_runner
    assert resolve_runner("auto", "auto", None, [architecture], str(tmp_path)) == expected
