"""/v1/embeddings through the official openai client, against sentence-transformers on a tiny
Qwen3-Embedding-shaped checkpoint; errors as OpenAI's; each model kind refuses the other's API."""
from __future__ import annotations

import asyncio
import base64

import numpy as np
import openai
import pytest
import pytest_asyncio
from openai import AsyncOpenAI

from tests.conftest import PROMPTS, assert_pool_clean
from tests.embedding_checkpoints import sentence_transformers_checkpoint
from tests.server.conftest import MAX_MODEL_LEN, MODEL_NAME, live_server, wait_until_idle

pytestmark = pytest.mark.asyncio(loop_scope="session")
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def embedding_model(tiny_model_dir, tmp_path_factory) -> str:
    return str(sentence_transformers_checkpoint(tiny_model_dir("qwen3"),
                                                tmp_path_factory.mktemp("embedding-server") / "st"))


@pytest.fixture(scope="module")
def reference(embedding_model):
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(embedding_model, device="cpu")
    return lambda texts: model.encode(texts, convert_to_numpy=True)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def embedding_server(embedding_model):
    async with live_server(embedding_model) as live:
        yield live


@pytest_asyncio.fixture(loop_scope="session")
async def embedder(embedding_server):
    async with AsyncOpenAI(base_url=embedding_server.api, api_key="unused", max_retries=0, timeout=60) as client:
        yield client
    await wait_until_idle(embedding_server.engine)
    assert_pool_clean(embedding_server.engine.llm_engine)  # no KV kept once the prompts have run


def assert_close(actual, expected) -> None:
    actual, expected = np.asarray(actual, dtype=np.float32), np.asarray(expected, dtype=np.float32)
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() < TOLERANCE


def _decoded(embedding, encoding_format):
    if encoding_format == "base64":  # asked for explicitly, the client hands the string over as is
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return embedding


# None: the client asks for base64 itself and decodes it.
@pytest.mark.parametrize("encoding_format", ["float", "base64", None])
async def test_batch_of_strings_equals_sentence_transformers(embedder, reference, encoding_format):
    extra = {"encoding_format": encoding_format} if encoding_format else {}
    response = await embedder.embeddings.create(model=MODEL_NAME, input=PROMPTS, user="someone", **extra)
    assert response.object == "list" and response.model == MODEL_NAME
    assert [item.index for item in response.data] == list(range(len(PROMPTS)))
    assert all(item.object == "embedding" for item in response.data)
    assert_close([_decoded(item.embedding, encoding_format) for item in response.data], reference(PROMPTS))


async def test_base64_is_little_endian_float32_of_the_float_vector(embedding_server, http):
    url = embedding_server.api + "/embeddings"
    bodies = []
    for encoding_format in ("float", "base64"):
        async with http.post(url, json={"model": MODEL_NAME, "input": "Hello, my name is",
                                        "encoding_format": encoding_format}) as response:
            assert response.status == 200
            bodies.append(await response.json())
    decoded = np.frombuffer(base64.b64decode(bodies[1]["data"][0]["embedding"]), dtype="<f4")
    assert decoded.tolist() == np.asarray(bodies[0]["data"][0]["embedding"], dtype=np.float32).tolist()


async def test_token_ids_and_usage(embedder, embedding_server, reference):
    tokenizer = embedding_server.engine.tokenizer
    ids = [tokenizer.encode(text) for text in PROMPTS[:3]]
    many = await embedder.embeddings.create(model=MODEL_NAME, input=ids, encoding_format="float")
    assert_close([item.embedding for item in many.data], reference(PROMPTS[:3]))
    total = sum(len(one) for one in ids)
    assert (many.usage.prompt_tokens, many.usage.total_tokens) == (total, total)
    one = await embedder.embeddings.create(model=MODEL_NAME, input=ids[1], encoding_format="float")
    assert len(one.data) == 1 and one.usage.prompt_tokens == len(ids[1])
    assert_close([one.data[0].embedding], reference(PROMPTS[1:2]))
    text = await embedder.embeddings.create(model=MODEL_NAME, input=PROMPTS[1])
    assert text.usage.prompt_tokens == len(ids[1])


async def test_concurrent_requests_of_mixed_lengths_batch_to_the_same_vectors(embedder, reference):
    texts = PROMPTS + ["word " * 100, "x"]
    responses = await asyncio.gather(*(embedder.embeddings.create(model=MODEL_NAME, input=text)
                                       for text in texts))
    assert_close([response.data[0].embedding for response in responses], reference(texts))


async def test_truncate_prompt_tokens_keeps_the_last_tokens(embedding_server, http, reference):
    tokenizer = embedding_server.engine.tokenizer
    ids = tokenizer.encode("word " * 300)
    assert len(ids) > MAX_MODEL_LEN
    async with http.post(embedding_server.api + "/embeddings",
                         json={"input": [ids], "truncate_prompt_tokens": 40}) as response:
        body = await response.json()
    assert response.status == 200 and body["usage"]["prompt_tokens"] == 40
    async with http.post(embedding_server.api + "/embeddings", json={"input": [ids[-40:]]}) as response:
        expected = (await response.json())["data"][0]["embedding"]
    assert_close([body["data"][0]["embedding"]], [expected])


@pytest.mark.parametrize("body,param,words", [
    ({"input": ""}, "input", "empty"),
    ({"input": []}, "input", "empty"),
    ({"input": ["ok", ""]}, "input", "empty"),
    ({"input": [[1, 2], []]}, "input", "empty"),
    ({"input": ["ok", 3]}, "input", "non-empty string"),
    ({"input": [1, "a"]}, "input", "non-empty string"),
    ({"input": 5}, "input", "must be a string"),
    ({"input": [[1, True]]}, "input", "token"),
    ({"input": [10 ** 9]}, "input", "token ids must be in"),
    ({}, "input", "must be a string"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
    ({"input": "hi", "dimensions": 16}, "dimensions", "not a Matryoshka model"),
    ({"input": "hi", "dimensions": 0}, "dimensions", "positive"),
    ({"input": "hi", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "-1 or >= 1"),
    ({"input": "hi", "truncate_prompt_tokens": MAX_MODEL_LEN + 1}, "truncate_prompt_tokens", "max_model_len"),
    ({"input": "word " * 400}, "input", f"maximum context length is {MAX_MODEL_LEN} tokens (max_model_len)"),
    ({"input": [[1] * (MAX_MODEL_LEN + 1)]}, "input", "max_model_len"),
])
async def test_bad_inputs_get_openai_shaped_400s(embedding_server, http, body, param, words):
    async with http.post(embedding_server.api + "/embeddings", json={"model": MODEL_NAME, **body}) as response:
        error = (await response.json())["error"]
    assert response.status == 400, error
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"]


async def test_a_whole_context_is_accepted(embedding_server, http):
    async with http.post(embedding_server.api + "/embeddings", json={"input": [[1] * MAX_MODEL_LEN]}) as response:
        assert response.status == 200


async def test_unknown_model_is_404(embedder):
    with pytest.raises(openai.NotFoundError):
        await embedder.embeddings.create(model="other", input="hi")


@pytest.mark.parametrize("path,body,api", [
    ("/completions", {"prompt": "hi", "max_tokens": 2}, "Completions"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "Chat Completions"),
])
async def test_embedding_model_refuses_generation(embedding_server, http, path, body, api):
    async with http.post(embedding_server.api + path, json={"model": MODEL_NAME, **body}) as response:
        error = (await response.json())["error"]
    assert response.status == 400
    assert f"does not support the {api} API" in error["message"] and "/v1/embeddings" in error["message"]


async def test_generative_model_refuses_embeddings(client, server):
    with pytest.raises(openai.BadRequestError, match="does not support the Embeddings API"):
        await client.embeddings.create(model=MODEL_NAME, input="hi")
    assert_pool_clean(server.engine.llm_engine)


async def test_dimensions_of_a_matryoshka_model(tiny_model_dir, tmp_path, http):
    path = sentence_transformers_checkpoint(tiny_model_dir("qwen3"), tmp_path / "matryoshka",
                                            matryoshka_dimensions=[16, 32])
    async with live_server(str(path)) as live:
        url = live.api + "/embeddings"
        async with http.post(url, json={"input": "Hello", "dimensions": 16}) as response:
            short = (await response.json())["data"][0]["embedding"]
        async with http.post(url, json={"input": "Hello", "normalize": False}) as response:
            full = np.asarray((await response.json())["data"][0]["embedding"])
        async with http.post(url, json={"input": "Hello", "dimensions": 20}) as response:
            error = (await response.json())["error"]
    assert len(short) == 16
    assert_close([short], [full[:16] / np.linalg.norm(full[:16])])
    assert response.status == 400 and error["param"] == "dimensions" and "[16, 32]" in error["message"]

