"""The official openai client sends a data-URL image to a Gemma 3 server and gets the offline greedy answer
(the chat template's <start_of_image> grown into Gemma's image sequence, its tokens attended both ways);
a broken image is a 400 naming the part."""
from __future__ import annotations

import base64

import pytest
import pytest_asyncio

from asyncserve import LLM, SamplingParams
from asyncserve.testing.tiny_vision import build_tiny_vision_checkpoint
from tests.models.vision_checkpoints import GEMMA_ONE, image, png_bytes
from tests.server.conftest import live_server

pytestmark = pytest.mark.asyncio(loop_scope="session")
PICTURE = image(120, 90, 12)


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _messages(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, "detail": "high"}},
                                         {"type": "text", "text": "describe the quick brown fox"}]}]


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory):
    return build_tiny_vision_checkpoint(tmp_path_factory.mktemp("gemma3_server") / "gemma3", "gemma3")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def gemma_client(gemma_path):
    from openai import AsyncOpenAI
    async with live_server(gemma_path, dtype="float32") as live:
        async with AsyncOpenAI(base_url=live.api, api_key="unused", max_retries=0, timeout=60) as client:
            yield client


async def test_a_data_url_image_gets_the_offline_greedy_answer(gemma_path, gemma_client):
    offline = LLM(gemma_path, dtype="float32", device="cpu", num_gpu_blocks_override=128, max_model_len=512)
    expected = offline.generate({"prompt": GEMMA_ONE, "multi_modal_data": {"image": PICTURE}},
                                SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    models = await gemma_client.models.list()
    response = await gemma_client.chat.completions.create(
        model=models.data[0].id, messages=_messages(_data_url(png_bytes(PICTURE))), temperature=0, max_tokens=8)
    assert response.choices[0].message.content == expected.outputs[0].text
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)


async def test_a_truncated_image_is_a_400_naming_the_part(gemma_client):
    import openai
    models = await gemma_client.models.list()
    with pytest.raises(openai.BadRequestError) as caught:
        await gemma_client.chat.completions.create(
            model=models.data[0].id, messages=_messages(_data_url(png_bytes(PICTURE)[:200])), max_tokens=2)
    assert "cannot be decoded" in caught.value.body["message"]
    assert caught.value.body["param"] == "messages[0].content[0]"
