"""`asyncserve run-batch` (vLLM's, in OpenAI's batch format): one output line per request line, in input order,
bad lines as error records, and every good line's body what the live server answers for the same request."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from asyncserve.cli import main
from asyncserve.server import openai_app
from asyncserve.server.batch import app_on_private_socket, run_batch
from tests.embedding_checkpoints import sentence_transformers_checkpoint
from tests.server.conftest import MAX_MODEL_LEN, MODEL_NAME, make_engine

CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0,
        "ignore_eos": True}
COMPLETION = {"model": MODEL_NAME, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0,
              "ignore_eos": True, "logprobs": 2}
EMBEDDING = {"model": MODEL_NAME, "input": "Hello, my name is"}


def _line(custom_id: str, url: str, body: dict, method: str = "POST") -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


# (input line, custom_id of its record, status, error param): blank lines hold no request and get no record.
LINES = [
    (_line("chat-1", "/v1/chat/completions", CHAT), "chat-1", 200, None),
    (_line("completion-1", "/v1/completions", COMPLETION), "completion-1", 200, None),
    ('{"custom_id": "broken", "method": "POST", "url": ', None, 400, None),
    ("", None, None, None),
    (_line("elsewhere", "/v1/responses", CHAT), "elsewhere", 400, "url"),
    (_line("bad-field", "/v1/completions", {**COMPLETION, "max_tokens": -1}), "bad-field", 400, "max_tokens"),
    (_line("refused-field", "/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}]}), "refused-field", 400,
     "functions"),
    (_line("embedding-on-a-generative-model", "/v1/embeddings", EMBEDDING), "embedding-on-a-generative-model", 400,
     "model"),
    (_line("chat-1", "/v1/completions", COMPLETION), "chat-1", 400, "custom_id"),
    (_line("streamed", "/v1/completions", {**COMPLETION, "stream": True}), "streamed", 400, "stream"),
    (_line("get", "/v1/completions", COMPLETION, method="GET"), "get", 400, "method"),
    (_line("chat-2", "/v1/chat/completions", {**CHAT, "max_tokens": 3}), "chat-2", 200, None),
]
EXPECTED = [(custom_id, status, param) for _, custom_id, status, param in LINES if status is not None]
ENGINE_FLAGS = ["--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN), "--num-gpu-blocks-override", "512",
                "--served-model-name", MODEL_NAME, "--seed", "0"]


@pytest.fixture(scope="module")
def records(model_path, tmp_path_factory) -> list[dict]:
    """The CLI's main, in-process, over the file of LINES."""
    folder = tmp_path_factory.mktemp("run-batch")
    (folder / "requests.jsonl").write_text("\n".join(line for line, *_ in LINES) + "\n")
    assert main(["run-batch", "-i", str(folder / "requests.jsonl"), "-o", str(folder / "results.jsonl"),
                 "--model", model_path, *ENGINE_FLAGS]) == 0
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def test_every_request_line_gets_one_record_in_input_order(records):
    assert [(r["custom_id"], r["response"]["status_code"]) for r in records] == \
        [(custom_id, status) for custom_id, status, _ in EXPECTED]
    assert len({r["id"] for r in records}) == len(records)
    assert all(set(r) == {"id", "custom_id", "response", "error"} for r in records)
    assert all(set(r["response"]) == {"status_code", "request_id", "body"} for r in records)


def test_bad_lines_get_openais_error_object_naming_the_field(records):
    for record, (_, status, param) in zip(records, EXPECTED):
        if status == 200:
            assert record["error"] is None
            assert record["response"]["request_id"] == record["response"]["body"]["id"]
            continue
        assert record["error"] == record["response"]["body"]["error"]
        assert record["error"]["type"] == "invalid_request_error" and record["error"]["param"] == param
    broken, duplicate = records[2], records[7]
    assert broken["error"]["code"] == "invalid_json" and broken["error"]["message"].startswith("Line 3: ")
    assert duplicate["error"]["code"] == "duplicate_custom_id"


def _without_ids(body: dict) -> dict:
    return {key: value for key, value in body.items() if key not in ("id", "created")}


def _floats_rounded(value):
    """Logprobs of a batch differ from a lone request's in the last bits (another batch shape, another sum
    order); everything else must be equal."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {key: _floats_rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_floats_rounded(item) for item in value]
    return value


@pytest.mark.asyncio(loop_scope="session")
async def test_each_body_is_what_the_live_server_answers(records, server, http):
    sent = [(line, record) for record, (line, _, status, param) in zip(records, [e for e in LINES if e[2]])
            if status == 200 or param in ("max_tokens", "functions", "model")]  # the others never reach it
    assert len(sent) == 6
    for line, record in sent:
        request = json.loads(line)
        async with http.post(server.url + request["url"], json=request["body"]) as response:
            assert response.status == record["response"]["status_code"]
            assert _floats_rounded(_without_ids(await response.json())) == \
                _floats_rounded(_without_ids(record["response"]["body"]))


def _embedding_model(tiny_model_dir, tmp_path_factory) -> str:
    return sentence_transformers_checkpoint(tiny_model_dir("qwen3"), str(tmp_path_factory.mktemp("batch-st") / "st"))


@pytest.mark.asyncio(loop_scope="session")
async def test_embedding_lines_on_an_embedding_model(tiny_model_dir, tmp_path_factory):
    engine = make_engine(_embedding_model(tiny_model_dir, tmp_path_factory))
    lines = [_line("e-1", "/v1/embeddings", EMBEDDING), _line("c-1", "/v1/chat/completions", CHAT),
             _line("e-2", "/v1/embeddings", {**EMBEDDING, "input": ["one", "two"]})]
    records: list[dict] = []
    async with app_on_private_socket(openai_app(engine, log_requests=False)) as session:
        summary = await run_batch(session, lines, records.append, max_in_flight=2)
        async with session.post("http://batch/v1/embeddings", json=EMBEDDING) as response:
            direct = await response.json()
    assert (summary.lines, summary.succeeded, summary.failed) == (3, 2, 1)
    assert [(r["custom_id"], r["response"]["status_code"]) for r in records] == [("e-1", 200), ("c-1", 400),
                                                                                   ("e-2", 200)]
    assert _without_ids(records[0]["response"]["body"]) == _without_ids(direct)
    assert len(records[2]["response"]["body"]["data"]) == 2
    assert "Chat Completions" in records[1]["error"]["message"]


def test_stdin_to_stdout_as_a_command(model_path):
    request = _line("only", "/v1/completions", {**COMPLETION, "max_tokens": 2})
    result = subprocess.run([sys.executable, "-m", "asyncserve", "run-batch", "-i", "-", "-o", "-",
                             "--model", model_path, *ENGINE_FLAGS], input=request + "\n", capture_output=True,
                            text=True, timeout=120, check=False, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, result.stderr
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["custom_id"] == "only" and record["response"]["body"]["usage"]["completion_tokens"] == 2
    assert "run-batch: 1 requests in" in result.stderr  # start-up and summary logs go to stderr, as the bar


def test_missing_files_fail_before_the_model_loads(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["run-batch", "-i", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "out.jsonl"), "--model",
              "asyncserve/tiny-random"])
    assert caught.value.code == 2
    assert capsys.readouterr().err.strip() == \
        f"asyncserve: error: run-batch cannot read -i {tmp_path / 'none.jsonl'}: No such file or directory."
    with pytest.raises(SystemExit) as caught:
        main(["run-batch", "-i", str(tmp_path / "none.jsonl")])
    assert caught.value.code == 2 and "run-batch needs -i INPUT" in capsys.readouterr().err
