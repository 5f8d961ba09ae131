"""vLLM's `return_token_ids`: the prompt's and the output's token ids beside the text (what RL frameworks read),
equal to what the tokenizer and the engine hold; streamed as each chunk's new ids (the prompt's in the first)."""
from __future__ import annotations

import pytest

from tests.server.conftest import MODEL_NAME

pytestmark = pytest.mark.asyncio(loop_scope="session")
PROMPT = "The capital of France is"


async def test_completions_return_the_prompt_and_output_ids(client, server):
    tokenizer = server.engine.tokenizer
    result = await client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                             extra_body={"return_token_ids": True, "ignore_eos": True})
    choice = result.choices[0].model_dump()
    assert choice["prompt_token_ids"] == tokenizer.encode(PROMPT)
    assert len(choice["token_ids"]) == 8
    assert tokenizer.decode(choice["token_ids"], skip_special_tokens=True) == choice["text"]
    stream = await client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                             stream=True, extra_body={"return_token_ids": True, "ignore_eos": True})
    chunks = [chunk.choices[0].model_dump() async for chunk in stream if chunk.choices]
    assert chunks[0]["prompt_token_ids"] == tokenizer.encode(PROMPT)
    assert all("prompt_token_ids" not in chunk or chunk["prompt_token_ids"] is None for chunk in chunks[1:])
    assert [t for chunk in chunks for t in chunk["token_ids"]] == choice["token_ids"]
    plain = await client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2)
    assert "token_ids" not in plain.choices[0].model_dump() or plain.choices[0].model_dump()["token_ids"] is None


async def test_chat_returns_them_beside_the_message(client, server):
    result = await client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=6, temperature=0,
                                                  extra_body={"return_token_ids": True, "ignore_eos": True})
    body = result.model_dump()
    assert body["prompt_token_ids"] and body["prompt_token_ids"][-1] >= 0
    assert len(body["choices"][0]["token_ids"]) == 6
    stream = await client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=6, stream=True, temperature=0,
                                                  extra_body={"return_token_ids": True, "ignore_eos": True})
    chunks = [chunk.model_dump() async for chunk in stream]
    assert chunks[0]["prompt_token_ids"] == body["prompt_token_ids"]
    streamed = [t for chunk in chunks[1:] for choice in chunk["choices"] for t in (choice.get("token_ids") or [])]
    assert streamed == body["choices"][0]["token_ids"]  # greedy: the same six tokens, chunk by chunk
