"""scripts/bench_models.py: a real config plus a one-token-per-id word-level tokenizer, served with dummy weights."""
from __future__ import annotations

import json
import pathlib
import re

import pytest
from transformers import AutoConfig, AutoTokenizer

from tests.server.conftest import live_server
from tests.server.test_bench_serving import load_script


@pytest.fixture(scope="module")
def word_model(model_path, tmp_path_factory) -> str:
    """The tiny qwen3's shapes (its config, not its weights) with the word-level tokenizer."""
    bench_models = load_script("bench_models")
    config = json.loads((pathlib.Path(model_path) / "config.json").read_text())
    return bench_models.write_model_dir(config, str(tmp_path_factory.mktemp("word-model")))


def test_every_id_is_one_word_and_round_trips(word_model):
    tokenizer = AutoTokenizer.from_pretrained(word_model)
    vocab = AutoConfig.from_pretrained(word_model).vocab_size
    assert len(tokenizer) == vocab
    ids = [0, 1, 7, vocab // 2, vocab - 1, 7]
    text = tokenizer.decode(ids)
    assert text == " ".join(f"t{i}" for i in ids)
    assert tokenizer.encode(text, add_special_tokens=False) == ids
    assert tokenizer.encode(text) == ids  # no BOS added: a prompt of N words is N tokens, as in vLLM's count
    eos = AutoConfig.from_pretrained(word_model).eos_token_id
    assert tokenizer.eos_token_id == (eos[0] if isinstance(eos, list) else eos)


def test_model_dir_for_a_named_config_is_written_once(tmp_path):
    bench_models = load_script("bench_models")
    out = bench_models.model_dir("qwen2.5-0.5b", str(tmp_path / "q"))
    config = json.loads((pathlib.Path(out) / "config.json").read_text())
    assert config == bench_models.load_config("qwen2.5-0.5b") and config["vocab_size"] > 150_000
    stamp = (pathlib.Path(out) / "tokenizer.json").stat().st_mtime_ns
    assert bench_models.model_dir("qwen2.5-0.5b", out) == out
    assert (pathlib.Path(out) / "tokenizer.json").stat().st_mtime_ns == stamp


@pytest.mark.asyncio(loop_scope="session")
async def test_asyncserve_serves_it_with_dummy_weights_and_real_detokenization(word_model, http):
    async with live_server(word_model, load_format="dummy") as server:
        body = {"model": "tiny-qwen3", "prompt": "t5 t6 t7 t8", "max_tokens": 6, "ignore_eos": True,
                "temperature": 0}
        async with http.post(server.api + "/completions", json=body) as response:
            assert response.status == 200, await response.text()
            data = await response.json()
    assert data["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}
    words = data["choices"][0]["text"].split()
    assert len(words) == 6 and all(re.fullmatch(r"t\d+", w) for w in words)
