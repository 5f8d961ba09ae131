"""Bad requests get the right status and an OpenAI error body, never a 500; the server serves on."""
from __future__ import annotations

import json

import aiohttp
import orjson
import pytest

from tests.server.conftest import MAX_MODEL_LEN, MODEL_NAME, live_server

pytestmark = pytest.mark.asyncio(loop_scope="session")

ANY = object()
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
OK_PROMPT = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2}
OK_CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
LONG_PROMPT = [5] * (MAX_MODEL_LEN + 10)


def completion(**fields) -> dict:
    return {**OK_PROMPT, **fields}


def chat(**fields) -> dict:
    return {**OK_CHAT, **fields}


# (case id, method, path, body: dict / bytes / None, status, error.param)
CASES = [
    ("invalid-json", "POST", COMPLETIONS, b'{"prompt": "Hello",', 400, None),
    ("nan-is-not-json", "POST", COMPLETIONS, b'{"prompt": "Hi", "temperature": NaN}', 400, None),
    ("empty-body", "POST", COMPLETIONS, b"", 400, None),
    ("body-is-an-array", "POST", COMPLETIONS, b"[1, 2]", 400, None),
    ("missing-prompt", "POST", COMPLETIONS, {"model": MODEL_NAME}, 400, "prompt"),
    ("prompt-is-a-number", "POST", COMPLETIONS, completion(prompt=5), 400, "prompt"),
    ("prompt-empty-list", "POST", COMPLETIONS, completion(prompt=[]), 400, "prompt"),
    ("prompt-mixed-list", "POST", COMPLETIONS, completion(prompt=["a", 1]), 400, "prompt"),
    ("prompt-empty-string", "POST", COMPLETIONS, completion(prompt=""), 400, "prompt"),
    ("token-id-out-of-vocab", "POST", COMPLETIONS, completion(prompt=[10 ** 6]), 400, "prompt"),
    ("negative-token-id", "POST", COMPLETIONS, completion(prompt=[-1, 2]), 400, "prompt"),
    ("prompt-too-long", "POST", COMPLETIONS, completion(prompt=LONG_PROMPT), 400, "prompt"),
    ("prompt-plus-max-tokens-too-long", "POST", COMPLETIONS, completion(max_tokens=MAX_MODEL_LEN), 400,
     "max_tokens"),
    ("negative-max-tokens", "POST", COMPLETIONS, completion(max_tokens=-1), 400, "max_tokens"),
    ("max-tokens-string", "POST", COMPLETIONS, completion(max_tokens="ten"), 400, "max_tokens"),
    ("max-tokens-float", "POST", COMPLETIONS, completion(max_tokens=1.5), 400, "max_tokens"),
    ("max-tokens-huge", "POST", COMPLETIONS, completion(max_tokens=10 ** 30), 400, "max_tokens"),
    ("max-tokens-over-int64", "POST", COMPLETIONS, completion(max_tokens=2 ** 63), 400, "max_tokens"),
    ("temperature-negative", "POST", COMPLETIONS, completion(temperature=-1), 400, "temperature"),
    ("temperature-string", "POST", COMPLETIONS, completion(temperature="hot"), 400, "temperature"),
    ("temperature-infinite", "POST", COMPLETIONS, b'{"prompt": "Hi", "temperature": 1e999}', 400, None),
    ("top-p-2", "POST", COMPLETIONS, completion(top_p=2), 400, "top_p"),
    ("top-p-0", "POST", COMPLETIONS, completion(top_p=0), 400, "top_p"),
    ("top-k-below-minus-one", "POST", COMPLETIONS, completion(top_k=-5), 400, "top_k"),
    ("min-p-over-1", "POST", COMPLETIONS, completion(min_p=1.5), 400, "min_p"),
    ("n-0", "POST", COMPLETIONS, completion(n=0), 400, "n"),
    ("n-boolean", "POST", COMPLETIONS, completion(n=True), 400, "n"),
    ("n-over-max-num-seqs", "POST", COMPLETIONS, completion(n=1000), 400, "n"),
    ("best-of-below-n", "POST", COMPLETIONS, completion(n=3, best_of=2), 400, "best_of"),
    ("best-of-streamed", "POST", COMPLETIONS, completion(n=1, best_of=2, stream=True), 400, "best_of"),
    ("presence-penalty-3", "POST", COMPLETIONS, completion(presence_penalty=3), 400, "presence_penalty"),
    ("repetition-penalty-0", "POST", COMPLETIONS, completion(repetition_penalty=0), 400, "repetition_penalty"),
    ("seed-string", "POST", COMPLETIONS, completion(seed="abc"), 400, "seed"),
    ("seed-over-int64", "POST", COMPLETIONS, completion(seed=2 ** 64 - 1), 400, "seed"),
    ("stop-number", "POST", COMPLETIONS, completion(stop=5), 400, "stop"),
    ("stop-empty-string", "POST", COMPLETIONS, completion(stop=[""]), 400, "stop"),
    ("stop-token-ids-strings", "POST", COMPLETIONS, completion(stop_token_ids=["a"]), 400, "stop_token_ids"),
    ("min-tokens-over-max", "POST", COMPLETIONS, completion(min_tokens=5, max_tokens=2), 400, "min_tokens"),
    ("logit-bias-bad-key", "POST", COMPLETIONS, completion(logit_bias={"abc": 1}), 400, "logit_bias"),
    ("logit-bias-out-of-vocab", "POST", COMPLETIONS, completion(logit_bias={"999999": 1}), 400, "logit_bias"),
    ("logit-bias-value-200", "POST", COMPLETIONS, completion(logit_bias={"5": 200}), 400, "logit_bias"),
    ("logit-bias-value-string", "POST", COMPLETIONS, completion(logit_bias={"5": "x"}), 400, "logit_bias"),
    ("logprobs-over-max", "POST", COMPLETIONS, completion(logprobs=21), 400, "logprobs"),
    ("logprobs-negative", "POST", COMPLETIONS, completion(logprobs=-1), 400, "logprobs"),
    ("stream-not-boolean", "POST", COMPLETIONS, completion(stream="yes"), 400, "stream"),
    ("stream-options-without-stream", "POST", COMPLETIONS, completion(stream_options={"include_usage": True}),
     400, "stream_options"),
    ("suffix-unsupported", "POST", COMPLETIONS, completion(suffix="end"), 400, "suffix"),
    ("unknown-model", "POST", COMPLETIONS, completion(model="gpt-4o"), 404, "model"),
    ("model-not-a-string", "POST", COMPLETIONS, completion(model=["x"]), 400, "model"),
    ("chat-missing-messages", "POST", CHAT, {"model": MODEL_NAME}, 400, "messages"),
    ("chat-messages-not-a-list", "POST", CHAT, chat(messages="hi"), 400, "messages"),
    ("chat-messages-empty", "POST", CHAT, chat(messages=[]), 400, "messages"),
    ("chat-message-not-an-object", "POST", CHAT, chat(messages=[1]), 400, "messages"),
    ("chat-bad-role", "POST", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400,
     "messages[0].role"),
    ("chat-missing-content", "POST", CHAT, chat(messages=[{"role": "user"}]), 400, "messages[0].content"),
    ("chat-content-number", "POST", CHAT, chat(messages=[{"role": "user", "content": 3}]), 400,
     "messages[0].content"),
    ("chat-image-part", "POST", CHAT,
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
     "messages[0].content[0]"),
    ("chat-top-logprobs-without-logprobs", "POST", CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    ("chat-top-logprobs-over-max", "POST", CHAT, chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("chat-logprobs-not-boolean", "POST", CHAT, chat(logprobs=3), 400, "logprobs"),
    ("chat-max-completion-tokens-0", "POST", CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("chat-tool-without-function", "POST", CHAT, chat(tools=[{"type": "function"}]), 400, "tools[0].function"),
    ("chat-json-schema-without-schema", "POST", CHAT, chat(response_format={"type": "json_schema"}), 400,
     "response_format"),
    ("chat-template-kwargs-reserved", "POST", CHAT, chat(chat_template_kwargs={"tokenize": True}), 400,
     "chat_template_kwargs"),
    ("chat-too-long", "POST", CHAT, chat(messages=[{"role": "user", "content": "word " * 600}]), 400,
     "messages"),
    ("chat-unknown-model", "POST", CHAT, chat(model="nope"), 404, "model"),
    ("wrong-method-completions", "GET", COMPLETIONS, None, 405, None),
    ("wrong-method-models", "DELETE", "/v1/models", None, 405, None),
    ("unknown-path", "GET", "/v1/engines", None, 404, None),
    ("unknown-model-card", "GET", "/v1/models/nope", None, 404, "model"),
    ("body-too-large", "POST", COMPLETIONS, b'{"prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}', 413, None),
    ("tokenize-missing-prompt", "POST", "/tokenize", {"model": MODEL_NAME}, 400, "prompt"),
    ("detokenize-bad-tokens", "POST", "/detokenize", {"tokens": ["a"]}, 400, "tokens"),
]


@pytest.mark.parametrize("case_id,method,path,body,status,param", CASES, ids=[case[0] for case in CASES])
async def test_bad_request_gets_status_and_openai_error_body(server, http, case_id, method, path, body, status,
                                                             param):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    async with http.request(method, server.url + path, data=data,
                            headers={"Content-Type": "application/json"}) as response:
        payload = orjson.loads(await response.read())
        assert response.status == status, payload
        assert response.headers["Content-Type"].startswith("application/json")
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and len(error["message"]) > 10
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if status == 405:
        assert response.headers["Allow"]


async def test_bad_input_never_reached_the_500_handler_and_the_server_serves_on(server, client):
    assert server.state.metrics.num_internal_errors == 0
    result = await client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3,
                                             extra_body={"ignore_eos": True})
    assert result.usage.completion_tokens == 3
    assert server.engine.is_running
    assert not server.engine.llm_engine.requests


async def test_api_key_is_required_on_api_routes_only(model_path):
    async with live_server(model_path, app_options={"api_key": "sekret"}) as live, aiohttp.ClientSession() as http:
        async def status(method, path, key=None, body=None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            async with http.request(method, live.url + path, json=body, headers=headers) as response:
                payload = await response.read()
                is_json = response.content_type == "application/json"
                return response.status, (orjson.loads(payload) if is_json else payload), response.headers

        code, payload, headers = await status("POST", COMPLETIONS, body=OK_PROMPT)
        assert code == 401 and payload["error"]["code"] == "invalid_api_key"
        assert headers["WWW-Authenticate"] == "Bearer"
        assert (await status("POST", COMPLETIONS, key="wrong", body=OK_PROMPT))[0] == 401
        assert (await status("GET", "/v1/models"))[0] == 401
        assert (await status("POST", "/tokenize", body={"prompt": "x"}))[0] == 401
        assert (await status("POST", COMPLETIONS, key="sekret", body=OK_PROMPT))[0] == 200
        assert (await status("GET", "/v1/models", key="sekret"))[0] == 200
        for open_path in ("/health", "/metrics", "/version"):
            assert (await status("GET", open_path))[0] == 200
        assert (await status("GET", "/v1/nothing-here"))[0] == 404

        from openai import AsyncOpenAI, AuthenticationError
        async with AsyncOpenAI(base_url=live.api, api_key="sekret", max_retries=0) as good, \
                AsyncOpenAI(base_url=live.api, api_key="bad", max_retries=0) as bad:
            assert [m.id for m in (await good.models.list()).data] == [MODEL_NAME]
            with pytest.raises(AuthenticationError):
                await bad.models.list()


async def test_full_waiting_queue_is_503_with_retry_after(model_path):
    async with live_server(model_path, max_num_waiting=0, max_num_seqs=1) as live, \
            aiohttp.ClientSession() as http:
        running = await http.post(live.url + COMPLETIONS, json=completion(max_tokens=400, ignore_eos=True,
                                                                          stream=True))
        await running.content.readuntil(b"\n\n")  # it holds the one running slot
        async with http.post(live.url + COMPLETIONS, json=OK_PROMPT) as response:
            payload = orjson.loads(await response.read())
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
        running.close()
        assert payload["error"]["code"] == "queue_full"
        assert payload["error"]["type"] == "server_error"
        assert live.state.metrics.num_internal_errors == 0


async def test_dead_engine_answers_503_and_health_fails(model_path):
    async with live_server(model_path) as live, aiohttp.ClientSession() as http:
        def broken_step(step):
            raise RuntimeError("simulated device failure")

        live.engine.llm_engine.executor.launch = broken_step
        async with http.post(live.url + COMPLETIONS, json=OK_PROMPT) as response:
            assert response.status == 503  # the request in flight when the engine died
        async with http.post(live.url + CHAT, json=OK_CHAT) as response:
            payload = orjson.loads(await response.read())
            assert response.status == 503  # refused up front afterwards
            assert payload["error"]["type"] == "server_error"
        stream_body = {**OK_PROMPT, "stream": True}
        async with http.post(live.url + COMPLETIONS, json=stream_body) as response:
            assert response.status == 503
        async with http.get(live.url + "/health") as response:
            assert response.status == 503
        assert live.state.metrics.num_internal_errors == 0


@pytest.mark.expect_internal_error
async def test_a_bug_becomes_a_logged_500_with_an_openai_body(model_path, caplog):
    async with live_server(model_path) as live, aiohttp.ClientSession() as http:
        def broken_stats():
            raise RuntimeError("simulated bug")

        live.engine.stats = broken_stats
        with caplog.at_level("ERROR", logger="asyncserve.server"):
            async with http.get(live.url + "/metrics") as response:
                payload = orjson.loads(await response.read())
                assert response.status == 500
        assert payload["error"]["type"] == "server_error" and payload["error"]["code"] == "internal_error"
        assert live.state.metrics.num_internal_errors == 1
        assert "unexpected error answering GET /metrics" in caplog.text
        assert "simulated bug" in caplog.text
        async with http.post(live.url + COMPLETIONS, json=OK_PROMPT) as response:
            assert response.status == 200  # everyone else is still served


async def test_custom_chat_template_is_used_and_its_errors_are_400(model_path):
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system "
                "messages') }}{% endif %}[{{ m['content'] }}]{% endfor %}")
    async with live_server(model_path, app_options={"chat_template": template}) as live, \
            aiohttp.ClientSession() as http:
        messages = [{"role": "user", "content": "Hi"}]
        async with http.post(live.url + "/tokenize", json={"messages": messages}) as response:
            assert (await response.json())["tokens"] == live.engine.tokenizer.encode("[Hi]",
                                                                                      add_special_tokens=False)
        bad = chat(messages=[{"role": "system", "content": "x"}, *messages])
        async with http.post(live.url + CHAT, json=bad) as response:
            payload = orjson.loads(await response.read())
            assert response.status == 400
        assert payload["error"]["param"] == "messages"
        assert "no system messages" in payload["error"]["message"]
