"""A Qwen-1 checkpoint served over HTTP: a chat request is rendered as ChatML by the qwen.tiktoken tokenizer,
and the answer (whole or streamed) is transformers' greedy output of the same weights."""
from __future__ import annotations

import json

import pytest
import pytest_asyncio
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import assert_pool_clean, hf_greedy
from tests.server.conftest import MODEL_NAME, live_server, wait_until_idle

pytestmark = pytest.mark.asyncio(loop_scope="session")

MESSAGES = [{"role": "user", "content": "Write a haiku about the sea."}]
MAX_TOKENS = 16
_REPLACEMENT = "\ufffd"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def qwen_server(qwen1_checkpoint):
    async with live_server(qwen1_checkpoint[0], trust_remote_code=True) as live:
        yield live


def _expected(qwen1_checkpoint, tokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy completion ids, the stop token included) from the Qwen2 reference."""
    reference = AutoModelForCausalLM.from_pretrained(qwen1_checkpoint[1], dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    prompt = tokenizer.encode(text)
    return prompt, hf_greedy(reference, prompt, MAX_TOKENS)


async def test_a_chat_request_answers_what_transformers_generates(qwen_server, qwen1_checkpoint, http):
    tokenizer = qwen_server.engine.tokenizer
    prompt, completion = _expected(qwen1_checkpoint, tokenizer)
    request = {"model": MODEL_NAME, "messages": MESSAGES, "temperature": 0.0, "max_tokens": MAX_TOKENS}
    async with http.post(qwen_server.api + "/chat/completions", json=request) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert body["usage"]["completion_tokens"] == len(completion)
    assert body["choices"][0]["message"]["content"] == tokenizer.decode(completion, skip_special_tokens=True)

    streamed = []
    async with http.post(qwen_server.api + "/chat/completions", json={**request, "stream": True}) as response:
        assert response.status == 200
        async for line in response.content:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    streamed.append(choice["delta"].get("content") or "")
    assert "".join(streamed) == tokenizer.decode(completion, skip_special_tokens=True)
    await wait_until_idle(qwen_server.engine)
    assert_pool_clean(qwen_server.engine.llm_engine)


async def test_chat_logprobs_give_each_tokens_own_bytes(qwen_server, qwen1_checkpoint, http):
    """Random weights emit pieces of multi-byte characters; each token's `bytes` are its bytes in
    qwen.tiktoken, not those of U+FFFD."""
    tokenizer = qwen_server.engine.tokenizer
    _, completion = _expected(qwen1_checkpoint, tokenizer)
    request = {"model": MODEL_NAME, "messages": MESSAGES, "temperature": 0.0, "max_tokens": MAX_TOKENS,
               "logprobs": True, "skip_special_tokens": False}
    async with http.post(qwen_server.api + "/chat/completions", json=request) as response:
        assert response.status == 200, await response.text()
        content = (await response.json())["choices"][0]["logprobs"]["content"]
    expected = [list(tokenizer.encoding.decode_single_token_bytes(token)) if token < len(tokenizer) else []
                for token in completion]  # the model's padding rows are no token: no bytes
    assert any(_REPLACEMENT in tokenizer.decode([token]) for token in completion)  # the case that matters
    assert [entry["bytes"] for entry in content] == expected
