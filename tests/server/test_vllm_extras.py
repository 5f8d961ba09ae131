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
    ("prompt_embeds", "AAAA"),
]


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
@pytest.mark.parametrize("name,value", REFUSED)
async def test_unbuilt_vllm_and_openai_features_get_400_not_supported(server, http, path, name, value):
    status, body = await _post(http, server, path, max_tokens=2, **{name: value})
    assert status == 400
    assert body["error"]["param"] == name
    assert "is not supported by this server" in body["error"]["message"]


async def test_reasoning_effort_is_a_chat_field_only(server, http):
    status, body = await _post(http, server, COMPLETIONS, max_tokens=2, reasoning_effort="high")
    assert status == 400 and body["error"]["param"] == "reasoning_effort"
    assert "/v1/chat/completions" in body["error"]["message"]
    status, body = await _post(http, server, CHAT, max_tokens=2, reasoning_effort="extreme")
    assert status == 400 and body["error"]["param"] == "reasoning_effort" and "low, medium, high" in body["error"]["message"]
    status, body = await _post(http, server, CHAT, max_tokens=2, reasoning_effort="low")
    assert status == 200, body


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


# ---- prompt_logprobs and continuous usage stats, in vLLM's shapes -----------------------------------


async def _engine_output(server, prompt, **params):
    final = None
    async for output in server.engine.generate(prompt, SamplingParams(**params)):
        final = output
    return final


def _vllm_prompt_logprobs(output) -> list:
    """What vLLM puts in `prompt_logprobs`: per prompt token, token id -> {logprob, rank, decoded_token}."""
    return [None if position is None else
            {str(token_id): {"logprob": max(entry.logprob, -9999.0), "rank": entry.rank,
                             "decoded_token": entry.decoded_token} for token_id, entry in position.items()}
            for position in output.prompt_logprobs]


async def test_completions_return_prompt_logprobs_as_the_offline_llm_computes_them(server, client):
    expected = _vllm_prompt_logprobs(await _engine_output(server, PROMPT, max_tokens=1, prompt_logprobs=2))
    result = await client.completions.create(model=MODEL_NAME, prompt=[PROMPT, PROMPT], n=2, max_tokens=2,
                                             extra_body={"prompt_logprobs": 2})
    assert len(result.choices) == 4
    for choice in result.choices:
        assert choice.prompt_logprobs == expected
    assert len(expected) == result.usage.prompt_tokens // 2
    assert expected[0] is None and all(len(position) in (2, 3) for position in expected[1:])


async def test_a_completions_stream_carries_prompt_logprobs_in_each_choices_first_chunk(server, http):
    expected = _vllm_prompt_logprobs(await _engine_output(server, PROMPT, max_tokens=1, prompt_logprobs=0))
    async with http.post(server.url + COMPLETIONS, json={"model": MODEL_NAME, "prompt": PROMPT, "n": 2,
                                                         "max_tokens": 4, "ignore_eos": True, "stream": True,
                                                         "prompt_logprobs": 0}) as response:
        chunks = _sse(await response.read())
    carried = [(chunk["choices"][0]["index"], chunk["choices"][0].get("prompt_logprobs")) for chunk in chunks]
    first = {index: logprobs for index, logprobs in reversed(carried)}
    assert first == {0: expected, 1: expected}
    assert sum(logprobs is not None for _, logprobs in carried) == 2


async def test_chat_returns_prompt_logprobs_beside_the_choices_and_refuses_them_streamed(server, http):
    status, body = await _post(http, server, CHAT, max_tokens=2, prompt_logprobs=1)
    assert status == 200, body
    prompt_ids = server.engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                                              return_dict=False)
    assert body["prompt_logprobs"] == _vllm_prompt_logprobs(
        await _engine_output(server, prompt_ids, max_tokens=1, prompt_logprobs=1))
    status, body = await _post(http, server, CHAT, max_tokens=2, prompt_logprobs=1, stream=True)
    assert status == 400
    assert body["error"]["param"] == "prompt_logprobs"


def _sse(raw: bytes) -> list[dict]:
    events = [line.removeprefix(b"data: ") for line in raw.split(b"\n\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    return [json.loads(event) for event in events[:-1]]


async def test_continuous_usage_stats_put_each_choices_usage_so_far_in_every_completions_chunk(client):
    stream = await client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, n=2, max_tokens=6, logprobs=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True})
    received = {0: 0, 1: 0}
    chunks = [chunk async for chunk in stream]
    prompt_tokens = chunks[-1].usage.prompt_tokens
    for chunk in chunks[:-1]:
        choice = chunk.choices[0]
        received[choice.index] += len(choice.logprobs.tokens)
        assert chunk.usage.model_dump(exclude_none=True) == {
            "prompt_tokens": prompt_tokens, "completion_tokens": received[choice.index],
            "total_tokens": prompt_tokens + received[choice.index]}
    assert received == {0: 6, 1: 6}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


async def test_continuous_usage_stats_in_a_chat_stream_start_at_zero_tokens(server, http):
    async with http.post(server.url + CHAT, json={
            "model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 5, "ignore_eos": True, "stream": True,
            "logprobs": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}) as response:
        chunks = _sse(await response.read())
    prompt_tokens = chunks[-1]["usage"]["prompt_tokens"]
    received = 0
    for chunk in chunks[:-1]:
        received += len((chunk["choices"][0]["logprobs"] or {}).get("content", []))
        assert chunk["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": received,
                                  "total_tokens": prompt_tokens + received}
    assert chunks[0]["usage"]["completion_tokens"] == 0 and received == 5


async def test_continuous_usage_stats_need_include_usage_as_in_vllm_and_a_boolean(server, http):
    async with http.post(server.url + COMPLETIONS, json={
            "model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 2, "stream": True,
            "stream_options": {"continuous_usage_stats": True}}) as response:
        assert all("usage" not in chunk for chunk in _sse(await response.read()))
    status, body = await _post(http, server, COMPLETIONS, stream=True,
                               stream_options={"include_usage": True, "continuous_usage_stats": "yes"})
    assert status == 400
    assert body["error"]["param"] == "stream_options.continuous_usage_stats"


# ---- vLLM routes asyncserve does not serve: a 404 that says so ---------------------------------------


@pytest.mark.parametrize("method,path,message", [
    ("POST", "/pooling", "POST /pooling (vLLM: the pooling API) is not built in asyncserve yet: use "
                         "/v1/embeddings."),
    ("GET", "/v1/realtime/sessions", "GET /v1/realtime/sessions (vLLM: the Realtime API) is not built in "
                                     "asyncserve yet."),
    ("POST", "/v1/audio/transcriptions", "POST /v1/audio/transcriptions (vLLM: speech-to-text models) is not "
                                         "built in asyncserve yet."),
    ("POST", "/v2/rerank", "POST /v2/rerank (vLLM: reranking) is not built in asyncserve yet."),
    ("POST", "/sleep", "POST /sleep (vLLM: sleep mode) is not built in asyncserve yet."),
    ("POST", "/scale_elastic_ep", "POST /scale_elastic_ep (vLLM: elastic expert parallelism) has no meaning in "
                                  "asyncserve."),
])
async def test_known_vllm_routes_answer_a_404_naming_the_unbuilt_feature(server, http, method, path, message):
    async with http.request(method, server.url + path, json={}) as response:
        assert response.status == 404
        assert await response.json() == {"error": {"message": message, "type": "invalid_request_error",
                                                   "param": None, "code": "not_implemented"}}


async def test_the_openai_client_hears_why_a_vllm_route_is_missing_and_other_paths_stay_plain_404s(
        server, client, http):
    import openai
    with pytest.raises(openai.NotFoundError) as caught:
        await client.post("/audio/transcriptions", body={"model": MODEL_NAME}, cast_to=object)
    assert caught.value.body["message"].startswith("POST /v1/audio/transcriptions (vLLM: speech-to-text models) "
                                                   "is not built")
    async with http.post(server.url + "/v1/audio/transcriptionsX", json={}) as response:
        assert (await response.json())["error"]["message"] == "Not found: no route matches this path."
