"""CORS as vLLM's --allowed-origins/--allowed-methods/--allowed-headers/--allow-credentials set it; off by default."""
from __future__ import annotations

import pytest

from asyncserve.cli import main
from asyncserve.errors import ConfigError
from asyncserve.server import CorsConfig

from tests.server.conftest import live_server

ORIGIN = "http://app.example"
PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


@pytest.mark.asyncio(loop_scope="session")
async def test_preflight_is_answered_without_the_api_key_and_the_real_request_carries_the_header(model_path, http):
    async with live_server(model_path, {"cors": CorsConfig(allowed_origins=["*"]), "api_key": "k"}) as live:
        async with http.options(live.api + "/chat/completions", headers=PREFLIGHT) as response:
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == "*"
            assert "POST" in response.headers["Access-Control-Allow-Methods"]
            assert response.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
            assert "Access-Control-Allow-Credentials" not in response.headers
        body = {"model": "tiny-qwen3", "prompt": "Hi", "max_tokens": 3, "stream": True}
        async with http.post(live.api + "/completions", json=body,
                             headers={"Origin": ORIGIN, "Authorization": "Bearer k"}) as response:
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == "*"
            assert (await response.read()).endswith(b"data: [DONE]\n\n")
        async with http.get(live.api + "/models", headers={"Origin": ORIGIN}) as response:
            assert response.status == 401  # the browser may read why it was refused
            assert response.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.asyncio(loop_scope="session")
async def test_listed_origins_with_credentials_are_echoed_and_others_get_nothing(model_path, http):
    cors = CorsConfig(allowed_origins=[ORIGIN], allowed_methods=["GET", "POST"],
                      allowed_headers=["content-type"], allow_credentials=True)
    async with live_server(model_path, {"cors": cors}) as live:
        async with http.get(live.api + "/models", headers={"Origin": ORIGIN}) as response:
            assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
            assert response.headers["Access-Control-Allow-Credentials"] == "true"
            assert response.headers["Vary"] == "Origin"
        async with http.get(live.api + "/models", headers={"Origin": "http://evil.example"}) as response:
            assert response.status == 200
            assert "Access-Control-Allow-Origin" not in response.headers
        allowed = {**PREFLIGHT, "Access-Control-Request-Headers": "Content-Type"}
        refused = [({**allowed, "Origin": "http://evil.example"}, "origin"),
                   ({**allowed, "Access-Control-Request-Method": "DELETE"}, "method"),
                   (PREFLIGHT, "headers")]  # authorization is not in the allowed headers
        for headers, what in refused:
            async with http.options(live.api + "/chat/completions", headers=headers) as response:
                assert response.status == 400
                assert await response.text() == f"Disallowed CORS {what}"
                assert (what == "origin") is ("Access-Control-Allow-Origin" not in response.headers)
        async with http.options(live.api + "/chat/completions", headers=allowed) as response:
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
            assert response.headers["Access-Control-Allow-Methods"] == "GET, POST"
            assert response.headers["Access-Control-Allow-Headers"] == "content-type"


@pytest.mark.asyncio(loop_scope="session")
async def test_no_cors_headers_unless_asked(server, http):
    async with http.options(server.api + "/chat/completions", headers=PREFLIGHT) as response:
        assert response.status == 405
        assert "Access-Control-Allow-Origin" not in response.headers
    async with http.get(server.api + "/models", headers={"Origin": ORIGIN}) as response:
        assert response.status == 200
        assert not any(name.startswith("Access-Control-") for name in response.headers)


def test_any_origin_with_credentials_is_refused_at_start_up():
    with pytest.raises(ConfigError, match="cannot go with --allow-credentials"):
        CorsConfig(allowed_origins=["*"], allow_credentials=True)
    with pytest.raises(ConfigError):
        CorsConfig(allowed_origins=["http://app.example", "*"], allow_credentials=True)
    CorsConfig(allowed_origins=["*"])  # without credentials: any origin may read, as '*' says
    CorsConfig(allowed_origins=[ORIGIN], allow_credentials=True)


def test_the_cli_refuses_any_origin_with_credentials_before_loading_a_model(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--model", "no/such-model", "--allowed-origins", '["*"]', "--allow-credentials"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "cannot go with --allow-credentials" in err and "Traceback" not in err
