"""vLLM's request extras over HTTP: built ones work, unbuilt ones get a 400, unknown fields a logged warning."""
from __future__ import annotations

import json
import logging
import shutil

import pytest

from asyncserve import SamplingParams
from tests.server.conftest import MAX_MODEL_LEN, MODEL_NAME, live_server

pytestmark = pytest.mark.asyncio(loop_scope="session")

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
PROMPT = "Hello, my name is"
MESSAGES = [{"role": "user", "content": "Tell me a story"}]


async def _post(http, server, path: str, **body) -> tuple[int, dict]:
    defaults = ({"model": MODEL_NAME, "prompt": PROMPT} if path == COMPLETIONS
                else {"model": MODEL_NAME, "messages": MESSAGES})
    async with http.post(server.url + path, json={**defaults, **body}) as response:
        return response.status, await response.json()


async def _engine_text(server, prompt, **params) -> str:
    final = None
    async for output in server.engine.generate(prompt, SamplingParams(**params)):
        final = output
    return final.outputs[0].text


REFUSED = [
    ("guided_whitespace_pattern", "[ ]?"), ("structural_tag", '{"structures": []}'),
    ("functions", [{"name": "f"}]), ("logits_processors", ["my.proc"]),
    ("cache_salt", "tenant-a"), ("priority", 5), ("reasoning_effort", "high"), ("prompt_embeds", "AAAA"),
]


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
@pytest.mark.parametrize("name,value", REFUSED)
async def test_unbuilt_vllm_and_openai_features_get_400_not_supported(server, http, path, name, value):
    status, body = await _post(http, server, path, max_tokens=2, **{name: value})
    assert status == 400
    assert body["error"]["param"] == name
    assert "is not supported by this server" in body["error"]["message"]


@pytest.mark.parametrize("neutral", [{"tools": []}, {"tool_choice": "none"}, {"response_format": {"type": "text"}},
                                     {"parallel_tool_calls": True}, {"guided_json": None}, {"priority": 0},
                                     {"add_special_tokens": False}, {"echo": False}])
async def test_neutral_values_of_refused_fields_are_fine(server, http, neutral, caplog):
    with caplog.at_level(logging.WARNING, logger="asyncserve.server"):
        status, body = await _post(http, server, CHAT, max_tokens=2, **neutral)
    assert status == 200, body
    assert "ignored" not in caplog.text


async def test_unknown_fields_are_logged_as_ignored_by_name(server, http, caplog):
    with caplog.at_level(logging.WARNING, logger="asyncserve.server"):
        status, _ = await _post(http, server, COMPLETIONS, max_tokens=2, frobnicate=1, store=True)
    assert status == 200
    assert ("The following fields were present in the request but ignored: ['frobnicate', 'store']"
            in caplog.text)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="asyncserve.server"):
        status, _ = await _post(http, server, COMPLETIONS, max_tokens=2, top_k=3, min_p=0.1)
    assert status == 200
    assert "ignored" not in caplog.text


async def test_allowed_token_ids_and_bad_words_reach_the_sampler(server, http):
    free = await _engine_text(server, PROMPT, temperature=0.0, max_tokens=6, ignore_eos=True)
    for extra in ({"allowed_token_ids": [5, 50, 500]}, {"bad_words": [free[:1]]}):
        status, body = await _post(http, server, COMPLETIONS, temperature=0, max_tokens=6, ignore_eos=True,
                                   **extra)
        assert status == 200, body
        text = body["choices"][0]["text"]
        assert text == await _engine_text(server, PROMPT, temperature=0.0, max_tokens=6, ignore_eos=True,
                                          **extra)
        assert text != free
    status, body = await _post(http, server, CHAT, temperature=0, max_tokens=4, allowed_token_ids=[7])
    assert status == 200
    assert body["usage"]["completion_tokens"] == 4
    assert body["choices"][0]["message"]["content"] == server.engine.tokenizer.decode([7] * 4)


async def test_constraints_are_refused_with_beam_search_rather_than_ignored(server, http):
    for name, value in (("allowed_token_ids", [5, 6]), ("bad_words", ["x"])):
        status, body = await _post(http, server, COMPLETIONS, max_tokens=2, use_beam_search=True, n=2,
                                   temperature=0, **{name: value})
        assert status == 400, body
        assert body["error"]["message"] == f"'{name}' is not supported with 'use_beam_search'."


@pytest.mark.parametrize("extra,param", [({"allowed_token_ids": []}, "allowed_token_ids"),
                                         ({"allowed_token_ids": [10 ** 7]}, "allowed_token_ids"),
                                         ({"allowed_token_ids": "5"}, "allowed_token_ids"),
                                         ({"bad_words": [3]}, "bad_words"),
                                         ({"bad_words": [" "]}, "bad_words"),
                                         ({"truncate_prompt_tokens": MAX_MODEL_LEN + 1}, "truncate_prompt_tokens"),
                                         ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens")])
async def test_invalid_extras_get_400_naming_them(server, http, extra, param):
    status, body = await _post(http, server, COMPLETIONS, max_tokens=2, **extra)
    assert status == 400, body
    assert body["error"]["param"] == param


async def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(server, http):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 6
    tail = server.engine.tokenizer.encode(long_prompt)[-7:]
    status, body = await _post(http, server, COMPLETIONS, prompt=long_prompt, truncate_prompt_tokens=7,
                               temperature=0, max_tokens=5, ignore_eos=True, echo=True)
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == 7
    expected = await _engine_text(server, tail, temperature=0.0, max_tokens=5, ignore_eos=True)
    assert body["choices"][0]["text"] == server.engine.tokenizer.decode(tail) + expected


async def test_add_generation_prompt_and_continue_final_message_shape_the_prompt(server, http):
    tokenizer = server.engine.tokenizer
    partial = MESSAGES + [{"role": "assistant", "content": "Once upon a"}]

    def count(messages, **kwargs) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs))

    status, body = await _post(http, server, CHAT, max_tokens=2, add_generation_prompt=False)
    assert status == 200
    assert body["usage"]["prompt_tokens"] == count(MESSAGES, add_generation_prompt=False)
    assert count(MESSAGES, add_generation_prompt=False) < count(MESSAGES, add_generation_prompt=True)
    status, body = await _post(http, server, CHAT, messages=partial, max_tokens=2, add_generation_prompt=False,
                               continue_final_message=True)
    assert status == 200, body
    continued = tokenizer.apply_chat_template(partial, tokenize=False, add_generation_prompt=False,
                                              continue_final_message=True)
    assert continued.endswith("Once upon a")
    assert body["usage"]["prompt_tokens"] == len(tokenizer.encode(continued, add_special_tokens=False))
    status, body = await _post(http, server, CHAT, messages=partial, max_tokens=2, continue_final_message=True)
    assert status == 400
    assert body["error"]["param"] == "continue_final_message"


@pytest.fixture(scope="module")
def model_with_generation_config(model_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("with-generation-config") / "model"
    shutil.copytree(model_path, path)
    file = path / "generation_config.json"
    config = json.loads(file.read_text())
    config.update(temperature=0.5, top_k=1, max_new_tokens=3, do_sample=True)
    file.write_text(json.dumps(config))
    return str(path)


async def test_generation_config_defaults_fill_the_fields_a_request_leaves_out(model_with_generation_config,
                                                                               http, caplog):
    with caplog.at_level(logging.INFO, logger="asyncserve"):
        async with live_server(model_with_generation_config) as live:
            assert ("default sampling parameters from the model's generation_config.json: temperature=0.5, "
                    "top_k=1, max_tokens=3" in caplog.text)
            greedy = await _engine_text(live, PROMPT, temperature=0.0, max_tokens=3, ignore_eos=True)
            for path in (COMPLETIONS, CHAT):
                status, body = await _post(http, live, path, ignore_eos=True)
                assert status == 200, body
                assert body["usage"]["completion_tokens"] == 3
            for seed in range(3):  # top_k=1 from the file makes any temperature greedy
                status, body = await _post(http, live, COMPLETIONS, ignore_eos=True, temperature=1.5, seed=seed)
                assert body["choices"][0]["text"] == greedy
            status, body = await _post(http, live, COMPLETIONS, ignore_eos=True, max_tokens=5, top_k=0,
                                       temperature=1.5, seed=0, n=4)
            assert body["usage"]["completion_tokens"] == 20  # what the request sets wins
            assert len({choice["text"] for choice in body["choices"]}) > 1
        async with live_server(model_with_generation_config, generation_config="vllm") as live:
            status, body = await _post(http, live, COMPLETIONS, ignore_eos=True)
            assert body["usage"]["completion_tokens"] == 16  # OpenAI's default, the file ignored
