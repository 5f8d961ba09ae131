"""The official `openai` client works unchanged against the server, and the answers are the model's."""
from __future__ import annotations

import orjson
import pytest

from tests.conftest import hf_greedy
from tests.server.conftest import MODEL_NAME

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROMPT = "The capital of France is"
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Once upon a time, in a land far away,"}]
IGNORE_EOS = {"ignore_eos": True}


async def test_models_list_names_the_served_model(client, server):
    models = await client.models.list()
    assert [model.id for model in models.data] == [MODEL_NAME]
    assert models.data[0].owned_by == "asyncserve"
    assert (await client.models.retrieve(MODEL_NAME)).id == MODEL_NAME


async def test_completion_matches_transformers_greedy(client, hf_reference):
    model, tokenizer = hf_reference("qwen3")
    expected_ids = hf_greedy(model, tokenizer.encode(PROMPT), 12)
    result = await client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    choice = result.choices[0]
    assert result.object == "text_completion"
    assert choice.text == tokenizer.decode(expected_ids, skip_special_tokens=True)
    assert result.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert result.usage.completion_tokens == len(expected_ids)
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert choice.finish_reason == ("length" if len(expected_ids) == 12 else "stop")


async def test_chat_matches_transformers_greedy_on_the_chat_template(client, hf_reference):
    model, tokenizer = hf_reference("qwen3")
    prompt_ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
    expected_ids = hf_greedy(model, prompt_ids, 16)
    result = await client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=16,
                                                  temperature=0)
    message = result.choices[0].message
    assert result.object == "chat.completion"
    assert message.role == "assistant"
    assert message.content == tokenizer.decode(expected_ids, skip_special_tokens=True)
    assert result.usage.prompt_tokens == len(prompt_ids)
    assert result.usage.completion_tokens == len(expected_ids)


async def test_max_completion_tokens_bounds_chat_output(client):
    result = await client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0,
                                                  max_completion_tokens=5, extra_body=IGNORE_EOS)
    assert result.usage.completion_tokens == 5
    assert result.choices[0].finish_reason == "length"


async def test_streamed_chat_equals_non_streamed_at_temperature_zero(client):
    full = await client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=24,
                                                temperature=0, extra_body=IGNORE_EOS)
    stream = await client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=24,
                                                  temperature=0, stream=True,
                                                  stream_options={"include_usage": True},
                                                  extra_body=IGNORE_EOS)
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert all(chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id for chunk in chunks)
    text_chunks = [chunk for chunk in chunks if chunk.choices]
    assert "".join(c.choices[0].delta.content or "" for c in text_chunks) == full.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in text_chunks]
    assert reasons[-1] == "length" and not any(reasons[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == 24
    assert usage_chunk.usage.prompt_tokens == full.usage.prompt_tokens
    assert all(chunk.usage is None for chunk in chunks[:-1])


async def test_streamed_completion_equals_non_streamed_at_temperature_zero(client):
    full = await client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=20, temperature=0,
                                           extra_body=IGNORE_EOS)
    stream = await client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=20, temperature=0,
                                             stream=True, extra_body=IGNORE_EOS)
    chunks = [chunk async for chunk in stream]
    assert "".join(chunk.choices[0].text for chunk in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(chunk.usage is None for chunk in chunks)


async def test_sse_wire_format_ends_with_done(http, server):
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "stream": True,
            "ignore_eos": True}
    async with http.post(server.api + "/chat/completions", json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        raw = (await response.read()).decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [orjson.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(set(p) == {"id", "object", "created", "model", "system_fingerprint", "choices"} for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


async def test_n_and_several_prompts_give_choices_indexed_prompt_major(client, server):
    encode = server.engine.tokenizer.encode
    result = await client.completions.create(model=MODEL_NAME, prompt=["Hello", "The cat sat"], n=2,
                                             max_tokens=6, temperature=1.0, seed=7, extra_body=IGNORE_EOS)
    assert [choice.index for choice in result.choices] == [0, 1, 2, 3]
    assert result.usage.completion_tokens == 4 * 6
    assert result.usage.prompt_tokens == len(encode("Hello")) + len(encode("The cat sat"))  # once per prompt
    assert all(choice.finish_reason == "length" for choice in result.choices)


async def test_n_and_several_prompts_stream_each_choice_to_its_end(client):
    stream = await client.completions.create(model=MODEL_NAME, prompt=["Hello", "The cat sat"], n=2,
                                             max_tokens=6, temperature=1.0, seed=7, stream=True,
                                             stream_options={"include_usage": True}, extra_body=IGNORE_EOS)
    texts, reasons = {}, {}
    usage = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                assert choice.index not in reasons  # finish_reason once per choice, on its last chunk
                reasons[choice.index] = choice.finish_reason
    assert reasons == {0: "length", 1: "length", 2: "length", 3: "length"}
    assert usage.completion_tokens == 24
    full = await client.completions.create(model=MODEL_NAME, prompt=["Hello", "The cat sat"], n=2,
                                           max_tokens=6, temperature=1.0, seed=7, extra_body=IGNORE_EOS)
    assert texts == {choice.index: choice.text for choice in full.choices}


async def test_chat_n_greater_than_one(client):
    result = await client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, n=3, max_tokens=5,
                                                  temperature=1.0, extra_body=IGNORE_EOS)
    assert [choice.index for choice in result.choices] == [0, 1, 2]
    assert result.usage.completion_tokens == 15


async def test_stop_string_ends_the_text_before_it(client):
    base = await client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=0,
                                           extra_body=IGNORE_EOS)
    text = base.choices[0].text
    stop = next(text[i:i + 2] for i in range(3, len(text) - 1)
                if "\ufffd" not in text[i:i + 2] and text[i:i + 2].strip())
    expected = text[:text.index(stop)]
    for streamed in (False, True):
        result = await client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16,
                                                 temperature=0, stop=[stop], stream=streamed,
                                                 extra_body=IGNORE_EOS)
        if streamed:
            chunks = [chunk async for chunk in result]
            got, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            got, reason = result.choices[0].text, result.choices[0].finish_reason
        assert (got, reason) == (expected, "stop")
    kept = await client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=0,
                                           stop=stop, extra_body={**IGNORE_EOS, "include_stop_str_in_output": True})
    assert kept.choices[0].text == expected + stop


async def test_seed_makes_sampling_reproducible(client):
    async def sample(seed):
        result = await client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16,
                                                 temperature=1.0, seed=seed, extra_body=IGNORE_EOS)
        return result.choices[0].text

    first, again, other = await sample(1234), await sample(1234), await sample(4321)
    assert first == again
    assert first != other


async def test_completion_logprobs_shape(client):
    result = await client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                             logprobs=3, extra_body=IGNORE_EOS)
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 8
    assert logprobs.text_offset[0] == 0
    for i, token in enumerate(logprobs.tokens):
        top = logprobs.top_logprobs[i]
        assert 3 <= len(top) <= 4  # the sampled token is always there, as in OpenAI's API
        assert top[token] == logprobs.token_logprobs[i] <= 0.0
        assert logprobs.token_logprobs[i] == max(top.values())  # greedy picks the most likely
        if i and not logprobs.tokens[i - 1].startswith("bytes:"):
            assert logprobs.text_offset[i] - logprobs.text_offset[i - 1] == len(logprobs.tokens[i - 1])


async def test_completion_logprobs_over_the_limit_is_refused(client):
    import openai
    with pytest.raises(openai.BadRequestError) as caught:
        await client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2, logprobs=21)
    assert caught.value.body["param"] == "logprobs"


async def test_chat_logprobs_shape_and_bytes(client, server):
    result = await client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10,
                                                  temperature=0, logprobs=True, top_logprobs=2,
                                                  extra_body=IGNORE_EOS)
    content = result.choices[0].logprobs.content
    assert len(content) == result.usage.completion_tokens == 10
    special = set(server.engine.tokenizer.all_special_tokens)
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == entry.top_logprobs[0].logprob  # greedy
    raw = b"".join(bytes(entry.bytes) for entry in content if entry.token not in special)
    assert raw.decode("utf-8", errors="replace") == result.choices[0].message.content
    streamed = await client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10,
                                                    temperature=0, logprobs=True, top_logprobs=2, stream=True,
                                                    extra_body=IGNORE_EOS)
    streamed_entries = [entry async for chunk in streamed for choice in chunk.choices
                        if choice.logprobs for entry in choice.logprobs.content]
    assert [e.token for e in streamed_entries] == [e.token for e in content]


async def test_echo_prepends_the_prompt(client):
    plain = await client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0,
                                            extra_body=IGNORE_EOS)
    echoed = await client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0,
                                             echo=True, logprobs=1, extra_body=IGNORE_EOS)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    logprobs = echoed.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None  # the first prompt token has no context
    assert len(logprobs.tokens) == echoed.usage.prompt_tokens + 5
    assert "".join(logprobs.tokens[:echoed.usage.prompt_tokens]) == PROMPT


async def test_token_id_prompts_equal_text_prompts(client, server):
    ids = server.engine.tokenizer.encode(PROMPT)
    by_text = await client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0)
    by_ids = await client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, temperature=0)
    batch = await client.completions.create(model=MODEL_NAME, prompt=[ids, ids], max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert [c.text for c in batch.choices] == [by_text.choices[0].text] * 2


async def test_unknown_model_is_404(client):
    import openai
    with pytest.raises(openai.NotFoundError) as caught:
        await client.completions.create(model="gpt-5", prompt=PROMPT, max_tokens=2)
    assert caught.value.body["code"] == "model_not_found"
