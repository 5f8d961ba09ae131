"""Values that parse but make no sense, decided as OpenAI / vLLM do (docs/reliability.md says which and why)."""
from __future__ import annotations

import orjson
import pytest

from asyncserve.server.protocol import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
from tests.server.conftest import MAX_MODEL_LEN, MODEL_NAME

pytestmark = pytest.mark.asyncio(loop_scope="session")

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
PROMPT = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 3}
MESSAGES = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


async def _post(server, http, path: str, body: dict, content_type: str | None = "application/json"):
    headers = {"Content-Type": content_type} if content_type is not None else {}
    async with http.post(server.url + path, data=orjson.dumps(body), headers=headers,
                         skip_auto_headers=["Content-Type"]) as response:
        return response.status, orjson.loads(await response.read())


REFUSED = [
    ("temperature-1e300", COMPLETIONS, {**PROMPT, "temperature": 1e300}, "temperature"),
    ("temperature-above-2", COMPLETIONS, {**PROMPT, "temperature": 2.0001}, "temperature"),
    ("stop-token-id-outside-vocab", COMPLETIONS, {**PROMPT, "stop_token_ids": [10 ** 6]}, "stop_token_ids"),
    ("logit-bias-key-with-spaces", COMPLETIONS, {**PROMPT, "logit_bias": {" 1 ": 1}}, "logit_bias"),
    ("logit-bias-key-with-underscore", COMPLETIONS, {**PROMPT, "logit_bias": {"1_0": 1}}, "logit_bias"),
    ("logit-bias-key-arabic-digit", COMPLETIONS, {**PROMPT, "logit_bias": {"\u0661": 1}}, "logit_bias"),
    ("logit-bias-key-signed", COMPLETIONS, {**PROMPT, "logit_bias": {"+1": 1}}, "logit_bias"),
    ("message-name-not-a-string", CHAT, {**MESSAGES, "messages": [{"role": "user", "content": "Hi", "name": 5}]},
     "messages[0].name"),
    ("too-many-stop-strings", COMPLETIONS, {**PROMPT, "stop": [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]},
     "stop"),
    ("stop-string-too-long", COMPLETIONS, {**PROMPT, "stop": ["x" * (MAX_STOP_STRING_CHARS + 1)]}, "stop"),
    ("stop-100000-strings", COMPLETIONS, {**PROMPT, "stop": ["s"] * 100_000}, "stop"),
] + [(f"chat-template-kwargs-{name}", CHAT, {**MESSAGES, "chat_template_kwargs": {name: "x"}},
      "chat_template_kwargs")
     for name in ("bos_token", "eos_token", "pad_token", "messages", "tools", "documents", "add_generation_prompt",
                  "raise_exception")]


@pytest.mark.parametrize("case_id,path,body,param", REFUSED, ids=[case[0] for case in REFUSED])
async def test_questionable_value_is_a_400_naming_its_field(server, http, case_id, path, body, param):
    status, payload = await _post(server, http, path, body)
    assert status == 400, payload
    assert payload["error"]["param"] == param
    assert payload["error"]["type"] == "invalid_request_error"


ACCEPTED = [
    ("temperature-2", COMPLETIONS, {**PROMPT, "temperature": 2}),
    ("stop-token-id-last-of-vocab", COMPLETIONS, {**PROMPT, "stop_token_ids": [767]}),
    ("logit-bias-decimal-key", COMPLETIONS, {**PROMPT, "logit_bias": {"5": -100, "07": 1}}),
    ("message-name-string", CHAT, {**MESSAGES, "messages": [{"role": "user", "content": "Hi", "name": "ann"}]}),
    ("most-stop-strings", COMPLETIONS, {**PROMPT, "stop": ["x" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS}),
    ("chat-template-kwargs-own-variable", CHAT, {**MESSAGES, "chat_template_kwargs": {"enable_thinking": False}}),
]


@pytest.mark.parametrize("case_id,path,body", ACCEPTED, ids=[case[0] for case in ACCEPTED])
async def test_the_sensible_neighbour_is_accepted(server, http, case_id, path, body):
    assert server.engine.vocab_size == 768
    status, payload = await _post(server, http, path, body)
    assert status == 200, payload


async def test_top_k_above_the_vocabulary_is_clamped_to_it_as_in_vllm(server, http):
    texts = []
    for top_k in (10 ** 9, server.engine.vocab_size, -1):
        status, payload = await _post(server, http, COMPLETIONS, {**PROMPT, "max_tokens": 12, "seed": 7,
                                                                  "temperature": 1.0, "top_k": top_k})
        assert status == 200, payload
        texts.append(payload["choices"][0]["text"])
    assert texts[0] == texts[1] == texts[2]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
async def test_a_body_not_declared_as_json_is_415(server, http, content_type):
    status, payload = await _post(server, http, COMPLETIONS, PROMPT, content_type)
    assert status == 415, payload
    assert payload["error"]["code"] == "unsupported_media_type"
    assert payload["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("content_type", [None, "application/json; charset=utf-8", "application/vnd.api+json"])
async def test_json_content_types_and_a_missing_one_are_accepted(server, http, content_type):
    status, payload = await _post(server, http, COMPLETIONS, PROMPT, content_type)
    assert status == 200, payload


async def test_tokenize_and_detokenize_refuse_more_than_max_model_len(server, http):
    status, payload = await _post(server, http, "/detokenize", {"tokens": [5] * (MAX_MODEL_LEN + 1)})
    assert status == 400 and payload["error"]["param"] == "tokens"
    status, payload = await _post(server, http, "/detokenize", {"tokens": [5] * MAX_MODEL_LEN})
    assert status == 200
    status, payload = await _post(server, http, "/tokenize", {"prompt": "hello " * MAX_MODEL_LEN})
    assert status == 400 and payload["error"]["param"] == "prompt"
    assert f"maximum context length is {MAX_MODEL_LEN}" in payload["error"]["message"]
