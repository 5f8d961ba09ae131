"""`python -m asyncserve ...` is the `asyncserve` command (as `python -m vllm.entrypoints.openai.api_server`)."""
from asyncserve.cli import run

run()
