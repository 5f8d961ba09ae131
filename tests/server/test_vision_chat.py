"""The official openai client sends a data-URL image to a Qwen2.5-VL server and gets the offline greedy
answer; broken images and image parts to a text-only model are 400s naming the part (http(s) URLs:
test_image_urls.py)."""
from __future__ import annotations

import base64

import pytest
import pytest_asyncio

from asyncserve import LLM, SamplingParams
from asyncserve.testing.tiny_vision import build_tiny_vision_checkpoint
from tests.models.vision_checkpoints import PROMPT_ONE, image, png_bytes
from tests.server.conftest import live_server

pytestmark = pytest.mark.asyncio(loop_scope="session")
PICTURE = image(120, 90, 11)


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _messages(url: str, detail: str = "auto") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, "detail": detail}},
                                         {"type": "text", "text": "describe the quick brown fox"}]}]


@pytest.fixture(scope="module")
def vl_path(tmp_path_factory):
    return build_tiny_vision_checkpoint(tmp_path_factory.mktemp("vl_server") / "qwen2_5_vl")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def vl_server(vl_path):
    async with live_server(vl_path, dtype="float32", limit_mm_per_prompt='{"image": 1}') as live:
        yield live


@pytest_asyncio.fixture(loop_scope="session")
async def vl_client(vl_server):
    from openai import AsyncOpenAI
    async with AsyncOpenAI(base_url=vl_server.api, api_key="unused", max_retries=0, timeout=60) as client:
        yield client


async def test_a_data_url_image_gets_the_offline_greedy_answer(vl_path, vl_client):
    offline = LLM(vl_path, dtype="float32", device="cpu", num_gpu_blocks_override=128, max_model_len=512)
    expected = offline.generate({"prompt": PROMPT_ONE, "multi_modal_data": {"image": PICTURE}},
                                SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    response = await vl_client.chat.completions.create(
        model="tiny-qwen3", messages=_messages(_data_url(png_bytes(PICTURE)), "low"), temperature=0, max_tokens=8)
    assert response.choices[0].message.content == expected.outputs[0].text
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)


@pytest.mark.parametrize(("url", "message"), [
    (_data_url(png_bytes(PICTURE)[:200]), "cannot be decoded"),                 # truncated
    (_data_url(b"not an image at all"), "not an image"),                         # wrong type
    ("data:image/png;base64,@@@", "not valid base64"),
    ("ftp://example.com/cat.png", "unsupported URL scheme 'ftp'"),
    ("file:///etc/passwd", "file:// URLs are off"),
])
async def test_bad_images_are_400s_naming_the_part(vl_client, url, message):
    import openai
    with pytest.raises(openai.BadRequestError) as caught:
        await vl_client.chat.completions.create(model="tiny-qwen3", messages=_messages(url), max_tokens=2)
    body = caught.value.body
    assert message in body["message"] and body["param"] == "messages[0].content[0]"


async def test_a_decompression_bomb_and_too_many_images_are_400s(vl_client):
    import openai
    from PIL import Image
    bomb = _data_url(png_bytes(Image.new("1", (20000, 20000))))
    with pytest.raises(openai.BadRequestError, match="pixels"):
        await vl_client.chat.completions.create(model="tiny-qwen3", messages=_messages(bomb), max_tokens=2)
    two = _messages(_data_url(png_bytes(PICTURE)))
    two[0]["content"].append(two[0]["content"][0])
    with pytest.raises(openai.BadRequestError, match="at most 1"):
        await vl_client.chat.completions.create(model="tiny-qwen3", messages=two, max_tokens=2)
