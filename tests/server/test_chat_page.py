"""`GET /` serves the chat page: public, self-contained, shipped in the package (the browser test drives it)."""
from __future__ import annotations

import fnmatch
import pathlib
import re

import aiohttp
import pytest
from aiohttp import web

from asyncserve.server import openai_app
from asyncserve.server.page import chat_page_html
from tests.server.conftest import live_server, make_engine, serve

on_server_loop = pytest.mark.asyncio(loop_scope="session")

ROOT = pathlib.Path(__file__).resolve().parents[2]


async def _get(url: str, headers: dict | None = None):
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as response:
        return response.status, response.headers, await response.text()


@on_server_loop
async def test_root_serves_the_chat_page_as_html(server):
    status, headers, text = await _get(server.url + "/")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert text.encode() == chat_page_html()
    assert "<title>asyncserve chat</title>" in text
    # the page may only run its own inline code and talk to this server
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp


@on_server_loop
async def test_the_page_is_public_while_the_api_needs_the_key(model_path):
    async with live_server(model_path, app_options={"api_key": "sekret"}) as live:
        status, _, text = await _get(live.url + "/")
        assert status == 200 and "asyncserve chat" in text
        assert (await _get(live.url + "/v1/models"))[0] == 401
        assert (await _get(live.url + "/v1/models", {"Authorization": "Bearer sekret"}))[0] == 200


@on_server_loop
async def test_mounted_app_serves_the_page_under_its_prefix(model_path):
    app = web.Application()
    app.add_subapp("/llm", openai_app(make_engine(model_path), log_requests=False))
    async with serve(app) as url:
        status, headers, text = await _get(url + "/llm/")
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert (await _get(url + "/"))[0] == 404  # nothing leaks onto the host app's root


def test_page_is_self_contained_and_renders_text_only():
    html = chat_page_html().decode()
    # no CDN, no external script, style or font: every URL in the page is relative
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html and "<script src" not in html
    # model output and user text reach the DOM only as text
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in html
    # API paths are relative to the page, so a mount prefix is kept
    assert '"v1/chat/completions"' in html and '"v1/models"' in html
    assert '"/v1/' not in html


def test_the_page_ships_as_package_data():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["asyncserve"]
    page = (ROOT / "asyncserve" / "server" / "static" / "chat.html")
    assert page.is_file()
    relative = page.relative_to(ROOT / "asyncserve").as_posix()
    assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns)


@on_server_loop
async def test_no_other_site_may_show_the_page_in_a_frame(server):
    _, headers, _ = await _get(server.url + "/")
    assert headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
