"""The chat page in a real browser (headless Chromium through selenium) against a live server.

The server runs on the tests' event loop, so every blocking browser step runs in a worker thread.
"""
from __future__ import annotations

import asyncio
import shutil

import aiohttp
import pytest
from aiohttp import web
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from asyncserve.server import openai_app
from tests.server.conftest import MODEL_NAME, live_server, make_engine, serve, wait_until_idle

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="needs Chromium and its driver: apt-get install chromium chromium-driver"),
]

TIMEOUT = 60  # seconds a browser step may take on a loaded CI machine before the test gives up

# Records every length the last assistant reply takes, and whether the reply had ended at that moment.
WATCH_REPLIES = """
window.replyLengths = [];
new MutationObserver(() => {
  const bubbles = document.querySelectorAll(".message.assistant");
  const last = bubbles[bubbles.length - 1];
  if (!last) return;
  const reply = last.querySelector(".reply");
  window.replyLengths.push([reply ? reply.textContent.length : 0, last.dataset.finish || null]);
}).observe(document.getElementById("conversation"),
           {childList: true, subtree: true, characterData: true, attributes: true});
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1000,720", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(TIMEOUT)
    yield driver
    driver.quit()


def _wait(driver, condition, message: str):
    return WebDriverWait(driver, TIMEOUT, poll_frequency=0.02).until(lambda _: condition(), message)


def _text(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).get_property("textContent")


def _set(driver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def _assistant(driver, index: int = -1):
    return driver.find_elements(By.CSS_SELECTOR, ".message.assistant")[index]


def _open(driver, url: str) -> None:
    driver.get(url)
    _wait(driver, lambda: _text(driver, "model") == MODEL_NAME, "the model name never appeared")
    driver.execute_script(WATCH_REPLIES)


def _chat(driver, message: str, *, temperature: str = "0", max_tokens: str) -> None:
    _set(driver, "temperature", temperature)
    _set(driver, "max-tokens", max_tokens)
    _set(driver, "prompt", message)
    driver.find_element(By.ID, "send").click()


def _finished(driver, index: int = -1) -> str | None:
    """How the reply ended ("length", "stop", "stopped", "error"), or None while it streams or is absent."""
    bubbles = driver.find_elements(By.CSS_SELECTOR, ".message.assistant")
    try:
        return bubbles[index].get_attribute("data-finish")
    except IndexError:
        return None


def _reply(driver, index: int = -1) -> str:
    return _assistant(driver, index).find_element(By.CLASS_NAME, "reply").get_property("textContent")


def _stream_reply(driver, url: str, message: str, max_tokens: int, screenshot=None) -> dict:
    """Opens the page, sends `message`, waits for the reply to end; returns what the page showed."""
    _open(driver, url)
    _chat(driver, message, max_tokens=str(max_tokens))
    _wait(driver, lambda: _finished(driver), "the streamed reply never ended")
    if screenshot is not None:
        driver.save_screenshot(str(screenshot))
    return {"lengths": driver.execute_script("return window.replyLengths"), "reply": _reply(driver),
            "finish": _finished(driver),
            "user_text": driver.find_element(By.CSS_SELECTOR, ".message.user").get_property("textContent"),
            "html_elements_in_conversation": len(driver.find_elements(By.CSS_SELECTOR, "#conversation b, "
                                                                                       "#conversation img")),
            "send_enabled": driver.find_element(By.ID, "send").is_enabled(),
            "stop_enabled": driver.find_element(By.ID, "stop").is_enabled()}


async def _api_reply(url: str, message: str, max_tokens: int, key: str | None = None) -> str:
    """The same turn through the API without streaming: what the page must have assembled."""
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": message}], "temperature": 0,
            "max_tokens": max_tokens}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as http, http.post(url + "v1/chat/completions", json=body,
                                                          headers=headers) as response:
        assert response.status == 200
        return (await response.json())["choices"][0]["message"]["content"]


async def test_reply_streams_into_the_page_token_by_token_and_ends(server, browser, tmp_path):
    message = "Hello <b>there</b> <img src=x>"  # shown as typed: text, never markup
    screenshot = tmp_path / "chat.png"
    seen = await asyncio.to_thread(_stream_reply, browser, server.url + "/", message, 64, screenshot)

    growing = {length for length, finish in seen["lengths"] if finish is None and length > 0}
    assert len(growing) >= 2, f"the reply did not grow in steps: {seen['lengths']}"
    assert seen["finish"] == "length"
    assert seen["lengths"][-1][0] == len(seen["reply"])
    assert seen["reply"] == await _api_reply(server.url + "/", message, 64)  # no chunk lost or repeated
    assert seen["user_text"] == message and seen["html_elements_in_conversation"] == 0
    assert seen["send_enabled"] and not seen["stop_enabled"]
    assert screenshot.read_bytes().startswith(b"\x89PNG")


def _stop_midway(driver, url: str) -> dict:
    _open(driver, url)
    _chat(driver, "Keep talking", max_tokens="2000")
    _wait(driver, lambda: len(_reply(driver)) > 0, "no reply text before stopping")
    driver.find_element(By.ID, "stop").click()
    _wait(driver, lambda: _finished(driver), "stop did not end the reply")
    stopped = {"finish": _finished(driver), "length": len(_reply(driver)),
               "note": _assistant(driver).find_element(By.CLASS_NAME, "note").text}
    # the conversation goes on, the stopped reply included
    _chat(driver, "And now?", max_tokens="4")
    _wait(driver, lambda: _finished(driver, 1), "the next reply never ended")
    stopped.update(next_finish=_finished(driver, 1), next_reply=_reply(driver, 1),
                   length_after=len(_reply(driver, 0)))
    return stopped


async def test_stop_button_ends_the_stream_and_aborts_the_request(model_path, browser):
    async with live_server(model_path, max_model_len=2048) as live:
        seen = await asyncio.to_thread(_stop_midway, browser, live.url + "/")
        stats = await wait_until_idle(live.engine, timeout=TIMEOUT)
        assert stats["num_requests_running"] == 0 and stats["kv_cache_usage_perc"] == 0.0
        # the stopped request was aborted, not finished; only the 4-token follow-up finished
        assert live.state.metrics.finished_by_reason == {"length": 1}
    assert seen["finish"] == "stopped" and seen["note"] == "(stopped)"
    assert 0 < seen["length"] == seen["length_after"]  # nothing arrived after the stop
    assert seen["next_finish"] == "length" and seen["next_reply"]


def _key_flow(driver, url: str) -> dict:
    driver.get(url)
    driver.execute_script(WATCH_REPLIES)
    panel = driver.find_element(By.ID, "key-panel")
    _wait(driver, panel.is_displayed, "the page never asked for the API key")
    asked = _text(driver, "key-reason")
    _chat(driver, "Hi", max_tokens="8")  # sent before any key: it waits for the same prompt
    _set(driver, "api-key", "wrong")
    driver.find_element(By.ID, "save-key").click()
    _wait(driver, lambda: "refused" in _text(driver, "key-reason") and panel.is_displayed(),
          "a wrong key was not refused")
    refused = _text(driver, "key-reason")
    waiting = _finished(driver)
    _set(driver, "api-key", "sekret")
    driver.find_element(By.ID, "save-key").click()
    _wait(driver, lambda: _text(driver, "model") == MODEL_NAME, "the model name never appeared with the key")
    _wait(driver, lambda: _finished(driver), "the reply never ended")
    return {"asked": asked, "refused": refused, "waiting": waiting, "panel_hidden": not panel.is_displayed(),
            "finish": _finished(driver), "reply": _reply(driver)}


async def test_page_asks_for_the_api_key_then_chats_with_it(model_path, browser):
    async with live_server(model_path, app_options={"api_key": "sekret"}) as live:
        seen = await asyncio.to_thread(_key_flow, browser, live.url + "/")
        assert live.state.metrics.finished_by_reason == {"length": 1}  # the page's one chat turn
        assert seen["reply"] == await _api_reply(live.url + "/", "Hi", 8, key="sekret")
    assert seen["asked"] == "This server needs an API key."
    assert seen["refused"] == "That API key was refused; enter the right one."
    assert seen["waiting"] is None  # the message did not fail while the page waited for a key
    assert seen["panel_hidden"] and seen["finish"] == "length"


async def test_page_mounted_under_a_prefix_calls_the_api_there(model_path, browser):
    app = web.Application()  # the host app has no /v1 routes: only calls relative to /llm/ can work
    app.add_subapp("/llm", openai_app(make_engine(model_path), log_requests=False))
    async with serve(app) as url:
        seen = await asyncio.to_thread(_stream_reply, browser, url + "/llm/", "Hi", 8)
        assert seen["reply"] == await _api_reply(url + "/llm/", "Hi", 8)
    assert seen["finish"] == "length" and seen["reply"]
