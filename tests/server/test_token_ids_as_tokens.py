"""vLLM's `return_tokens_as_token_ids` (request field) and `--return-tokens-as-token-ids` (server default):
logprobs name every token "token_id:<id>", the id being the token the engine sampled or ranked, while the
logprob values, text offsets and bytes stay what they are without it."""
from __future__ import annotations

import json
import re

import pytest
import pytest_asyncio

from tests.server.conftest import MODEL_NAME, live_server

pytestmark = pytest.mark.asyncio(loop_scope="session")
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Hi"}]
ID_NAME = re.compile(r"token_id:(\d+)")
GREEDY = {"max_tokens": 8, "temperature": 0}


def _id(name: str) -> int:
    match = ID_NAME.fullmatch(name)
    assert match, f"{name!r} is not 'token_id:<id>'"
    return int(match.group(1))


async def _completion(http, url: str, **fields) -> dict:
    body = {"model": MODEL_NAME, "prompt": PROMPT, "logprobs": 3, "ignore_eos": True, **GREEDY, **fields}
    async with http.post(url + "/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def _chat(http, url: str, **fields) -> dict:
    body = {"model": MODEL_NAME, "messages": MESSAGES, "logprobs": True, "top_logprobs": 3, "ignore_eos": True,
            **GREEDY, **fields}
    async with http.post(url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def test_completions_name_sampled_and_top_tokens_by_their_ids(server, http):
    tokenizer = server.engine.tokenizer
    named = (await _completion(http, server.url, return_tokens_as_token_ids=True, return_token_ids=True,
                               echo=True))["choices"][0]
    plain = (await _completion(http, server.url, return_tokens_as_token_ids=False, echo=True))["choices"][0]
    prompt_ids = tokenizer.encode(PROMPT)
    logprobs, plain_logprobs = named["logprobs"], plain["logprobs"]
    assert logprobs["tokens"] == [f"token_id:{t}" for t in prompt_ids + named["token_ids"]]
    assert logprobs["token_logprobs"] == plain_logprobs["token_logprobs"]
    assert logprobs["text_offset"] == plain_logprobs["text_offset"]  # offsets still count the text's characters
    assert logprobs["top_logprobs"][0] is None  # the first prompt token has no context
    for token, top, plain_top in zip(logprobs["tokens"][1:], logprobs["top_logprobs"][1:],
                                     plain_logprobs["top_logprobs"][1:]):
        assert token in top  # the sampled token always among them, as OpenAI's
        assert sorted(top.values()) == sorted(plain_top.values())
        assert {tokenizer.decode([_id(name)]) for name in top} >= set(plain_top) - {
            key for key in plain_top if key.startswith("bytes:")}


async def test_completions_stream_names_each_chunks_tokens_by_id(server, http):
    whole = (await _completion(http, server.url, return_tokens_as_token_ids=True,
                               return_token_ids=True))["choices"][0]
    body = {"model": MODEL_NAME, "prompt": PROMPT, "logprobs": 2, "ignore_eos": True, "stream": True,
            "return_tokens_as_token_ids": True, "return_token_ids": True, **GREEDY}
    tokens, ids = [], []
    async with http.post(server.url + "/v1/completions", json=body) as response:
        async for line in response.content:
            if line.startswith(b"data: {"):
                choice = json.loads(line[6:])["choices"][0]
                tokens += choice["logprobs"]["tokens"]
                ids += choice["token_ids"]
                assert all(ID_NAME.fullmatch(name) for name in choice["logprobs"]["top_logprobs"][0])
    assert ids == whole["token_ids"]
    assert tokens == [f"token_id:{t}" for t in ids]


async def test_chat_names_tokens_by_id_keeping_their_bytes(server, http):
    named = await _chat(http, server.url, return_tokens_as_token_ids=True, return_token_ids=True)
    plain = await _chat(http, server.url)
    content = named["choices"][0]["logprobs"]["content"]
    plain_content = plain["choices"][0]["logprobs"]["content"]
    assert [entry["token"] for entry in content] == [f"token_id:{t}" for t in named["choices"][0]["token_ids"]]
    for entry, plain_entry in zip(content, plain_content, strict=True):
        assert (entry["logprob"], entry["bytes"]) == (plain_entry["logprob"], plain_entry["bytes"])
        assert [top["bytes"] for top in entry["top_logprobs"]] == [top["bytes"] for top in plain_entry["top_logprobs"]]
        assert [server.engine.tokenizer.decode([_id(top["token"])]) for top in entry["top_logprobs"]] == \
            [top["token"] for top in plain_entry["top_logprobs"]]


async def test_chat_stream_names_tokens_by_id(server, http):
    whole = await _chat(http, server.url, return_tokens_as_token_ids=True, return_token_ids=True)
    body = {"model": MODEL_NAME, "messages": MESSAGES, "logprobs": True, "top_logprobs": 2, "ignore_eos": True,
            "stream": True, "return_tokens_as_token_ids": True, **GREEDY}
    names = []
    async with http.post(server.url + "/v1/chat/completions", json=body) as response:
        async for line in response.content:
            if line.startswith(b"data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    for entry in (choice.get("logprobs") or {}).get("content") or []:
                        names.append(entry["token"])
                        assert all(ID_NAME.fullmatch(top["token"]) for top in entry["top_logprobs"])
    assert names == [f"token_id:{t}" for t in whole["choices"][0]["token_ids"]]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def ids_by_default_server(model_path):
    async with live_server(model_path, app_options={"return_tokens_as_token_ids": True}) as live:
        yield live


async def test_the_server_flag_is_the_default_a_request_may_turn_off(ids_by_default_server, http):
    url = ids_by_default_server.url
    by_default = await _chat(http, url, return_token_ids=True)
    content = by_default["choices"][0]["logprobs"]["content"]
    assert [entry["token"] for entry in content] == [f"token_id:{t}" for t in by_default["choices"][0]["token_ids"]]
    turned_off = await _completion(http, url, return_tokens_as_token_ids=False)
    assert not any(ID_NAME.fullmatch(token) for token in turned_off["choices"][0]["logprobs"]["tokens"])


async def test_a_non_boolean_value_is_a_400_naming_the_field(server, http):
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 1, "return_tokens_as_token_ids": "yes"}
    async with http.post(server.url + "/v1/completions", json=body) as response:
        assert response.status == 400
        assert (await response.json())["error"]["param"] == "return_tokens_as_token_ids"


async def test_the_cli_flag_sets_the_server_default():
    from asyncserve.cli import build_parser, parse_args
    assert parse_args(build_parser(), ["some/model", "--return-tokens-as-token-ids"]).return_tokens_as_token_ids
    assert not parse_args(build_parser(), ["some/model"]).return_tokens_as_token_ids
