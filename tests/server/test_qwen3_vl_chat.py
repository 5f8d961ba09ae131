"""The official openai client sends a data-URL image to a Qwen3-VL server and gets the offline greedy answer
(itself transformers' token for token: tests/models/test_qwen3_vl.py), streamed or not; a broken image is a
400 naming the part."""
from __future__ import annotations

import base64

import pytest
import pytest_asyncio

from asyncserve import LLM, SamplingParams
from asyncserve.testing.tiny_vision import build_tiny_vision_checkpoint
from tests.models.vision_checkpoints import PROMPT_ONE, image, png_bytes
from tests.server.conftest import live_server

pytestmark = pytest.mark.asyncio(loop_scope="session")
PICTURE = image(200, 130, 13)


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _messages(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, "detail": "auto"}},
                                         {"type": "text", "text": "describe the quick brown fox"}]}]


@pytest.fixture(scope="module")
def vl3_server_path(tmp_path_factory):
    return build_tiny_vision_checkpoint(tmp_path_factory.mktemp("vl3_server") / "qwen3_vl", "qwen3_vl")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def vl3_client(vl3_server_path):
    from openai import AsyncOpenAI
    async with live_server(vl3_server_path, dtype="float32") as live:
        async with AsyncOpenAI(base_url=live.api, api_key="unused", max_retries=0, timeout=60) as client:
            yield client


@pytest.fixture(scope="module")
def expected(vl3_server_path):
    offline = LLM(vl3_server_path, dtype="float32", device="cpu", num_gpu_blocks_override=128, max_model_len=512)
    return offline.generate({"prompt": PROMPT_ONE, "multi_modal_data": {"image": PICTURE}},
                            SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]


async def test_a_data_url_image_gets_the_offline_greedy_answer(vl3_client, expected):
    models = await vl3_client.models.list()
    response = await vl3_client.chat.completions.create(
        model=models.data[0].id, messages=_messages(_data_url(png_bytes(PICTURE))), temperature=0, max_tokens=8)
    assert response.choices[0].message.content == expected.outputs[0].text
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)


async def test_a_streamed_answer_is_the_same_text(vl3_client, expected):
    models = await vl3_client.models.list()
    stream = await vl3_client.chat.completions.create(
        model=models.data[0].id, messages=_messages(_data_url(png_bytes(PICTURE))), temperature=0, max_tokens=8,
        stream=True)
    pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert "".join(pieces) == expected.outputs[0].text


async def test_a_truncated_image_is_a_400_naming_the_part(vl3_client):
    import openai
    models = await vl3_client.models.list()
    with pytest.raises(openai.BadRequestError) as caught:
        await vl3_client.chat.completions.create(
            model=models.data[0].id, messages=_messages(_data_url(png_bytes(PICTURE)[:200])), max_tokens=2)
    assert "cannot be decoded" in caught.value.body["message"]
    assert caught.value.body["param"] == "messages[0].content[0]"
