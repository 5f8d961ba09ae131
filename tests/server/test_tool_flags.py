"""The tool-calling and reasoning flags of the CLI, with vLLM's names and rules."""
from __future__ import annotations

import pytest

import asyncserve.server
from asyncserve.cli import build_parser, main


@pytest.mark.parametrize("flags,message", [
    (["--enable-auto-tool-choice"], "--enable-auto-tool-choice needs --tool-call-parser"),
    (["--tool-call-parser", "nope"], "--tool-call-parser 'nope' is not known; choose one of hermes, llama3_json, openai"),
    (["--reasoning-parser", "nope"], "--reasoning-parser 'nope' is not known; choose one of deepseek_r1, openai_gptoss, qwen3"),
])
def test_bad_parser_flags_exit_2_before_the_model_loads(flags, message, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--model", "no/such-model-is-loaded", "--port", "0", *flags])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_help_lists_the_flags():
    text = build_parser().format_help()
    for flag in ("--enable-auto-tool-choice", "--tool-call-parser", "--reasoning-parser"):
        assert flag in text


class _Stop(Exception):
    pass


def test_flags_reach_the_app(model_path, monkeypatch):
    seen = {}

    def fake_app(engine, **options):
        seen.update(options)
        raise _Stop

    monkeypatch.setattr(asyncserve.server, "openai_app", fake_app)
    with pytest.raises(_Stop):
        main(["--model", model_path, "--device", "cpu", "--port", "0", "--host", "127.0.0.1",
              "--num-gpu-blocks-override", "64", "--max-model-len", "256", "--enable-auto-tool-choice", "--tool-call-parser", "llama3_json",
              "--reasoning-parser", "qwen3"])
    assert (seen["enable_auto_tool_choice"], seen["tool_call_parser"], seen["reasoning_parser"]) == \
        (True, "llama3_json", "qwen3")
