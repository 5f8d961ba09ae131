"""`python -m asyncserve ...` is the `asyncserve` command (as `python -m vllm.entrypoints.openai.api_server`)."""
import sys

from asyncserve.cli import main

sys.exit(main())
