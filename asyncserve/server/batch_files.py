"""run-batch's files: the input read line by line (stdin too), the records written as JSON lines (stdout too),
and a progress bar while the batch runs."""
from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import BinaryIO

import orjson
from aiohttp import web

from asyncserve.errors import ConfigError
from asyncserve.server.batch import (
    MIN_IN_FLIGHT,
    BatchSummary,
    app_on_private_socket,
    run_batch,
)

STDIO = "-"


def open_batch_files(input_path: str, output_path: str) -> tuple[Iterable[bytes], int, BinaryIO]:
    """(the input's lines, how many of them hold a request, the output), opened before the model loads so that
    a wrong path fails at once. Stdin is read to its end here: a read on the event loop would stall the batch."""
    if input_path == STDIO:
        lines = sys.stdin.buffer.readlines()
        total = sum(1 for line in lines if line.strip())
    else:
        try:
            lines = open(input_path, "rb")  # noqa: SIM115 - closed by close_batch_files, after the run
        except OSError as exc:
            raise ConfigError(f"run-batch cannot read -i {input_path}: {exc.strerror or exc}.") from None
        total = sum(1 for line in lines if line.strip())
        lines.seek(0)
    if output_path == STDIO:
        return lines, total, sys.stdout.buffer
    try:
        return lines, total, open(output_path, "wb")
    except OSError as exc:
        lines.close()
        raise ConfigError(f"run-batch cannot write -o {output_path}: {exc.strerror or exc}.") from None


def close_batch_files(lines: Iterable[bytes], output: BinaryIO) -> None:
    """Closes the files; stdout stays open, flushed."""
    if hasattr(lines, "close"):
        lines.close()
    if output is sys.stdout.buffer:
        output.flush()
    else:
        output.close()


async def run_batch_file(app: web.Application, lines: Iterable[bytes], output: BinaryIO, *, total: int,
                         max_in_flight: int = MIN_IN_FLIGHT) -> BatchSummary:
    """`run_batch` over the app started here, records written to `output` as JSON lines, with a progress bar
    (on stderr; log lines print above it)."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    errors = 0

    def count(record: dict) -> None:
        nonlocal errors
        errors += record["response"]["status_code"] != 200
        bar.set_postfix(errors=errors, refresh=False)
        bar.update(1)

    def write(record: dict) -> None:
        output.write(orjson.dumps(record) + b"\n")

    with logging_redirect_tqdm(), tqdm(total=total, unit="req", desc="run-batch",
                                       mininterval=0.5 if sys.stderr.isatty() else 10.0) as bar:
        async with app_on_private_socket(app) as session:
            summary = await run_batch(session, lines, write, max_in_flight=max_in_flight, on_answer=count)
    output.flush()
    return summary
