"""Tensor parallelism: the engine process holds no model; it starts one worker process per local rank
(`python -m asyncserve.executor.worker`, the same command a rank on another host runs, and never a
re-import of the user's script as multiprocessing's spawn does) and sends each call to rank 0 over an
authenticated local connection; rank 0 broadcasts it to every rank. Only rank 0's
results come back (every rank samples the same ids from the same gathered logits and seeds).

A worker that dies fails the call in flight, and every later one, with WorkerDiedError instead of
a hang; `shutdown` (or the executor's collection, or the engine process's exit) ends the workers.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess
import sys
import weakref
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

import torch

from asyncserve.config.tree import Config
from asyncserve.errors import ConfigError, UnsupportedModelError, WorkerDiedError
from asyncserve.executor.base import Executor
from asyncserve.executor.protocol import (
    ENGINE_ADDRESS_ENV,
    ENGINE_KEY_ENV,
    recv_message,
    send_message,
)
from asyncserve.runner.step import StepMessage, StepOutput

logger = logging.getLogger("asyncserve")

# How many of the ranks this host runs (ranks 0..n-1); the others join from other hosts (docs/architecture.md).
LOCAL_WORLD_SIZE_ENV = "ASYNCSERVE_LOCAL_WORLD_SIZE"


def check_tensor_parallel(config: Config) -> None:
    """Refuses, before any worker starts, what cannot be split: embedding models, too few GPUs, and
    sizes that do not divide (said by the layers themselves, built as rank 0 on the meta device)."""
    size = config.parallel.tensor_parallel_size
    if config.model.is_pooling:
        raise ConfigError(f"tensor_parallel_size={size} is not supported for embedding models yet.")
    _check_splits(config, size)
    if config.model.device.type == "cuda" and torch.cuda.device_count() < _local_world_size(size):
        raise ConfigError(f"tensor_parallel_size={size} needs {_local_world_size(size)} GPUs on this host, "
                          f"torch sees {torch.cuda.device_count()}.")


def _check_splits(config: Config, size: int) -> None:
    """Builds rank 0's shard of the model without memory: heads, MLP widths, packed quantized tensors and
    the vocabulary must split over the ranks, and a layer that cannot says so by name."""
    from asyncserve.layers.parallel_state import set_tensor_parallel, tp_rank, tp_size
    from asyncserve.models.loader import build_model
    previous = tp_rank(), tp_size()
    set_tensor_parallel(0, size)
    try:
        build_model(config, device="meta")
    except (ConfigError, UnsupportedModelError):
        raise
    except ValueError as error:
        raise ConfigError(f"The model cannot be split over tensor_parallel_size={size}: {error}.") from None
    finally:
        set_tensor_parallel(*previous)


def _local_world_size(size: int) -> int:
    return int(os.environ.get(LOCAL_WORLD_SIZE_ENV, size))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _end(processes: list[subprocess.Popen], box: list) -> None:
    """Asks the workers to leave, then makes sure they have: no orphans."""
    conn = box[0]
    if conn is not None:
        try:
            send_message(conn, ("shutdown", ()))
        except (OSError, ValueError):
            pass
    for process in processes:
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if conn is not None:
        conn.close()


class _Done:
    """A step already run to the end by the workers (the multi-process PendingStep)."""

    def __init__(self, output: StepOutput | None, num_samples: list[int], num_drafts: list[int]):
        self._output = output
        self.num_samples = num_samples
        self.num_drafts = num_drafts

    @property
    def needs_grammar_masks(self) -> bool:
        return self._output is None

    def done(self) -> bool:
        return True

    def result(self) -> StepOutput:
        if self._output is None:
            raise RuntimeError("This step samples under grammar masks: the engine must hand them to "
                               "executor.sample() before reading its result.")
        return self._output


class MultiprocExecutor(Executor):
    def __init__(self, config: Config):
        check_tensor_parallel(config)
        self.config = config
        size = config.parallel.tensor_parallel_size
        key = secrets.token_bytes(32)
        server = socket.create_server(("127.0.0.1", 0))
        env = dict(os.environ, MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                   MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()), WORLD_SIZE=str(size),
                   **{ENGINE_ADDRESS_ENV: "127.0.0.1:%d" % server.getsockname()[1], ENGINE_KEY_ENV: key.hex()})
        self._processes = [
            subprocess.Popen([sys.executable, "-m", "asyncserve.executor.worker"],
                             env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank),
                                      LOCAL_WORLD_SIZE=str(_local_world_size(size))))
            for rank in range(_local_world_size(size))]
        self._box: list[Connection | None] = [None]
        self._finalizer = weakref.finalize(self, _end, self._processes, self._box)
        self._dead: str | None = None
        try:
            self._conn = self._box[0] = self._accept(server, key)
            send_message(self._conn, config)
            self._receive()  # every rank has loaded its shard
        except BaseException:
            self.shutdown()
            raise
        finally:
            server.close()

    def _accept(self, server: socket.socket, key: bytes) -> Connection:
        """Rank 0's connection, once it has proved it holds the key (checking the workers meanwhile)."""
        server.settimeout(0.2)
        while True:
            try:
                sock, _ = server.accept()
                break
            except socket.timeout:
                self._check_alive()
        sock.setblocking(True)
        conn = Connection(sock.detach())
        deliver_challenge(conn, key)
        answer_challenge(conn, key)
        return conn

    def _check_alive(self) -> None:
        if any(process.poll() is not None for process in self._processes):
            self._fail()

    def _fail(self, how: str = "") -> None:
        """Names the workers that ended (the first to die usually takes rank 0 down with it), ends the
        rest and raises."""
        try:
            self._processes[0].wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        ended = [f"rank {rank} (pid {process.pid}) "
                 + (f"killed by signal {-process.returncode}" if process.returncode < 0
                    else f"exited with code {process.returncode}")
                 for rank, process in enumerate(self._processes) if process.poll() is not None]
        self._dead = "tensor-parallel worker " + ("; ".join(ended) or how)
        self.shutdown()
        raise WorkerDiedError(f"{self._dead}: the engine cannot continue; restart it.")

    def _receive(self):
        while not self._conn.poll(0.2):
            self._check_alive()
        try:
            status, value = recv_message(self._conn)
        except (EOFError, OSError):
            self._fail("rank 0 closed its connection")
        if status == "error":
            raise value
        return value

    def _call(self, method: str, *args):
        if self._dead:
            raise WorkerDiedError(f"{self._dead}: the engine cannot continue; restart it.")
        send_message(self._conn, (method, args))
        return self._receive()

    def determine_num_blocks(self) -> int:
        return self._call("determine_num_blocks")

    def bytes_per_block(self) -> int:
        return self._call("bytes_per_block")

    def lora_shapes(self) -> dict[str, tuple[int, list[int]]]:
        return self._call("lora_shapes")  # whole shapes: every rank's are the same

    def initialize_cache(self, num_blocks: int, num_host_blocks: int, num_host_state_slots: int = 0) -> None:
        self._call("initialize_cache", num_blocks, num_host_blocks, num_host_state_slots)

    def launch(self, message: StepMessage) -> _Done:
        return _Done(self._call("launch", message), [seq.num_samples for seq in message.seqs],
                     [len(seq.draft_token_ids) for seq in message.seqs])

    def sample(self, pending: _Done, bitmask: torch.Tensor, rows: list[int]) -> None:
        pending._output = self._call("sample", bitmask, rows)

    def shutdown(self) -> None:
        self._finalizer()
