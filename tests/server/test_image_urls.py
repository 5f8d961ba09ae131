"""http(s) image URLs are downloaded by the server within vLLM's bounds (VLLM_IMAGE_FETCH_TIMEOUT, redirects,
--allowed-media-domains; 20 MiB; --limit-mm-per-prompt) from a local image server, give the data URL's answer,
and every failure is a 400 naming the part, while other requests go on."""
from __future__ import annotations

import asyncio
import base64
import os
import time

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from asyncserve import LLM, SamplingParams
from asyncserve.cli import build_parser, parse_args
from asyncserve.config.serve_flags import engine_config
from asyncserve.multimodal.fetch import FetchLimits, fetch_image, new_session
from asyncserve.multimodal.images import MAX_IMAGE_BYTES, InvalidImageError
from asyncserve.testing.tiny_vision import build_tiny_vision_checkpoint
from tests.models.vision_checkpoints import image, png_bytes
from tests.server.conftest import live_server, serve

ASYNC = pytest.mark.asyncio(loop_scope="session")
PICTURE_PNG = png_bytes(image(120, 90, 11))
FETCH_TIMEOUT_S = 2.0
MiB = 1024 * 1024


class ImageSite:
    """A local web server: a PNG, bodies over the limit, a slow image, a 404, HTML, redirects."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.slow_started = asyncio.Event()
        self.release = asyncio.Event()  # set at teardown: the slow handler returns
        self.streamed_bytes = 0
        app = web.Application()
        for path, handler in [("/cat.png", self.png), ("/counted.png", self.png),
                              ("/declared-huge.png", self.declared_huge), ("/streamed-huge.png", self.streamed_huge),
                              ("/slow.png", self.slow), ("/missing.png", self.missing), ("/page.html", self.page),
                              ("/moved.png", self.moved), ("/loop.png", self.loop), ("/to-ftp.png", self.to_ftp),
                              ("/to-localhost.png", self.to_localhost)]:
            app.router.add_get(path, handler)
        self.app = app
        self.url = ""

    def count(self, request: web.Request) -> None:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1

    async def png(self, request: web.Request) -> web.Response:
        self.count(request)
        return web.Response(body=PICTURE_PNG, content_type="image/png")

    async def _write(self, response: web.StreamResponse, total: int) -> int:
        """Bytes written before the reader hung up (total if it never did)."""
        chunk, written = bytes(MiB), 0
        try:
            while written < total:
                await response.write(chunk)
                written += len(chunk)
        except ConnectionError:  # "Connection lost" or a reset
            pass
        return written

    async def declared_huge(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.content_length = MAX_IMAGE_BYTES + MiB
        await response.prepare(request)
        await self._write(response, MAX_IMAGE_BYTES + MiB)
        return response

    async def streamed_huge(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()  # no Content-Length: only the bytes read tell
        await response.prepare(request)
        self.streamed_bytes = await self._write(response, 256 * MiB)
        return response

    async def slow(self, request: web.Request) -> web.Response:
        self.slow_started.set()
        await asyncio.wait_for(self.release.wait(), 30)
        return web.Response(body=PICTURE_PNG, content_type="image/png")

    async def missing(self, request: web.Request) -> web.Response:
        return web.Response(status=404, text="no such image")

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text="<html><body>not a picture</body></html>", content_type="text/html")

    async def moved(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/cat.png")

    async def loop(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop.png")

    async def to_ftp(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("ftp://127.0.0.1/cat.png")

    async def to_localhost(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(self.url.replace("127.0.0.1", "localhost") + "/cat.png")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def site():
    images = ImageSite()
    async with serve(images.app) as url:
        images.url = url
        yield images
        images.release.set()


@pytest.fixture(scope="module")
def vl_path(tmp_path_factory):
    return build_tiny_vision_checkpoint(tmp_path_factory.mktemp("vl_urls") / "qwen2_5_vl")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def vl_server(vl_path, site):
    """Only 127.0.0.1 allowed (so `localhost` is another, refused host); the timeout from vLLM's variable."""
    saved = os.environ.get("VLLM_IMAGE_FETCH_TIMEOUT")
    os.environ["VLLM_IMAGE_FETCH_TIMEOUT"] = str(FETCH_TIMEOUT_S)
    try:
        server = live_server(vl_path, dtype="float32", limit_mm_per_prompt='{"image": 1}',
                             allowed_media_domains=["127.0.0.1"])
        live = await server.__aenter__()
    finally:
        if saved is None:
            del os.environ["VLLM_IMAGE_FETCH_TIMEOUT"]
        else:
            os.environ["VLLM_IMAGE_FETCH_TIMEOUT"] = saved
    yield live
    await server.__aexit__(None, None, None)


@pytest_asyncio.fixture(loop_scope="session")
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def _messages(*urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": parts + [{"type": "text", "text": "describe the quick brown fox"}]}]


async def _chat(http, server, messages, max_tokens: int = 8) -> tuple[int, dict]:
    body = {"model": "tiny-qwen3", "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    async with http.post(server.api + "/chat/completions", json=body) as response:
        return response.status, await response.json()


@ASYNC
async def test_an_http_image_gets_the_data_url_answer(http, vl_server, site):
    data_url = "data:image/png;base64," + base64.b64encode(PICTURE_PNG).decode()
    status, inline = await _chat(http, vl_server, _messages(data_url))
    assert status == 200, inline
    status, fetched = await _chat(http, vl_server, _messages(site.url + "/cat.png"))
    assert status == 200, fetched
    assert fetched["choices"][0]["message"]["content"] == inline["choices"][0]["message"]["content"]
    assert fetched["usage"]["prompt_tokens"] == inline["usage"]["prompt_tokens"]
    status, redirected = await _chat(http, vl_server, _messages(site.url + "/moved.png"))
    assert status == 200 and redirected["choices"] == fetched["choices"]


@ASYNC
@pytest.mark.parametrize(("path", "message"), [
    ("/declared-huge.png", f"is {MAX_IMAGE_BYTES + MiB} bytes (its Content-Length); an image may be at most "
                           f"{MAX_IMAGE_BYTES}."),
    ("/missing.png", "answered HTTP 404 Not Found; an image URL must answer 200"),
    ("/page.html", "is not an image Pillow can read"),
    ("/loop.png", "redirects more than 5 times"),
    ("/to-ftp.png", "ftp://127.0.0.1/cat.png is not an http(s) URL"),
    ("/to-localhost.png", "the host 'localhost' of http://localhost:"),   # a redirect to a host not allowed
])
async def test_bad_image_urls_are_400s_naming_the_part(http, vl_server, site, path, message):
    status, body = await _chat(http, vl_server, _messages(site.url + path), max_tokens=2)
    assert status == 400
    assert message in body["error"]["message"] and body["error"]["param"] == "messages[0].content[0]"


@ASYNC
async def test_a_body_streamed_past_the_limit_is_cut_off(http, vl_server, site):
    started = time.perf_counter()
    status, body = await _chat(http, vl_server, _messages(site.url + "/streamed-huge.png"), max_tokens=2)
    assert status == 400 and f"is larger than {MAX_IMAGE_BYTES} bytes" in body["error"]["message"]
    assert time.perf_counter() - started < FETCH_TIMEOUT_S
    for _ in range(100):  # the site's handler returns once it sees the hang-up
        if site.streamed_bytes:
            break
        await asyncio.sleep(0.02)
    assert MAX_IMAGE_BYTES < site.streamed_bytes < 64 * MiB  # 256 MiB offered; dropped once past 20 MiB


@ASYNC
async def test_a_host_not_in_allowed_media_domains_is_refused_unfetched(http, vl_server, site):
    url = site.url.replace("127.0.0.1", "localhost") + "/counted.png"
    status, body = await _chat(http, vl_server, _messages(url), max_tokens=2)
    assert status == 400 and body["error"]["param"] == "messages[0].content[0]"
    assert "is not one of --allowed-media-domains (127.0.0.1)" in body["error"]["message"]
    assert "/counted.png" not in site.hits


@ASYNC
async def test_more_images_than_the_limit_are_refused_before_any_download(http, vl_server, site):
    status, body = await _chat(http, vl_server, _messages(site.url + "/counted.png", site.url + "/counted.png"))
    assert status == 400 and body["error"]["param"] == "messages"
    assert "carries 2 images; this server takes at most 1 (--limit-mm-per-prompt)" in body["error"]["message"]
    assert "/counted.png" not in site.hits


@ASYNC
async def test_a_slow_image_times_out_without_delaying_a_text_request(http, vl_server, site):
    started = time.perf_counter()
    slow = asyncio.ensure_future(_chat(http, vl_server, _messages(site.url + "/slow.png"), max_tokens=2))
    await asyncio.wait_for(site.slow_started.wait(), 5)
    text_started = time.perf_counter()
    status, body = await _chat(http, vl_server, [{"role": "user", "content": "the quick brown fox"}], max_tokens=2)
    text_seconds = time.perf_counter() - text_started
    assert status == 200 and body["usage"]["completion_tokens"] == 2
    assert not slow.done() and text_seconds < FETCH_TIMEOUT_S / 2
    status, body = await slow
    assert status == 400 and body["error"]["param"] == "messages[0].content[0]"
    assert f"did not arrive within {FETCH_TIMEOUT_S:g} s (VLLM_IMAGE_FETCH_TIMEOUT)" in body["error"]["message"]
    assert FETCH_TIMEOUT_S <= time.perf_counter() - started < FETCH_TIMEOUT_S + 1.5


@ASYNC
async def test_redirects_off_refuses_a_redirect(site):
    limits = FetchLimits(allow_redirects=False)
    async with new_session() as session:
        assert await fetch_image(session, site.url + "/cat.png", "p", limits) == PICTURE_PNG
        with pytest.raises(InvalidImageError, match=r"redirects \(HTTP 302\), and redirects are off "
                                                    r"\(VLLM_MEDIA_URL_ALLOW_REDIRECTS=0\)"):
            await fetch_image(session, site.url + "/moved.png", "p", limits)


def test_fetch_limits_read_vllms_environment_variables():
    limits = FetchLimits.from_env(["Images.Example"], {"VLLM_IMAGE_FETCH_TIMEOUT": "12",
                                                       "VLLM_MEDIA_URL_ALLOW_REDIRECTS": "0"})
    assert limits == FetchLimits(timeout_s=12.0, allow_redirects=False, allowed_domains=("images.example",))
    assert FetchLimits.from_env(None, {}) == FetchLimits(timeout_s=5.0, allow_redirects=True, allowed_domains=None)


def test_allowed_media_domains_is_vllms_flag(vl_path):
    args = parse_args(build_parser(), [vl_path, "--allowed-media-domains", "Images.Example", "cdn.example"])
    assert engine_config(args).allowed_media_domains == ["images.example", "cdn.example"]


@ASYNC
async def test_offline_chat_fetches_an_http_image_as_the_server_does(vl_path, site, http, vl_server):
    llm = LLM(vl_path, dtype="float32", device="cpu", num_gpu_blocks_override=128, max_model_len=512)
    params = SamplingParams(temperature=0, max_tokens=8)
    offline = await asyncio.to_thread(llm.chat, _messages(site.url + "/cat.png"), params, use_tqdm=False)
    _, served = await _chat(http, vl_server, _messages(site.url + "/cat.png"))
    assert offline[0].outputs[0].text == served["choices"][0]["message"]["content"]
    with pytest.raises(InvalidImageError, match=r"messages\[0\].content\[0\]: .* answered HTTP 404"):
        await asyncio.to_thread(llm.chat, _messages(site.url + "/missing.png"), params, use_tqdm=False)
