"""One tensor-parallel rank: joins the torch.distributed group through env:// (MASTER_ADDR,
MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, as torchrun sets them), builds its shard of the model in
a one-process executor, and runs what rank 0 broadcasts.

The engine starts its host's ranks with `python -m asyncserve.executor.worker`; rank 0 connects
back to it (the address and key in the environment) and receives each call (a step message,
`initialize_cache`, ...), broadcasts it to the other ranks over a gloo group, runs its part and
answers. Ranks on other hosts start with `python -m asyncserve.executor.worker` (or torchrun): they
need only the environment, since rank 0 broadcasts the engine's config first.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time

import torch
import torch.distributed as dist

from asyncserve.config.tree import Config
from asyncserve.executor.protocol import (
    ENGINE_ADDRESS_ENV,
    ENGINE_KEY_ENV,
    recv_message,
    send_message,
)
from asyncserve.layers.parallel_state import set_tensor_parallel


def _die_with_parent() -> None:
    """Ends this worker when the engine process is gone, however it died (SIGKILL included): its
    parent changes. (Linux's PR_SET_PDEATHSIG would fire when the starting *thread* ends.)"""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="asyncserve-parent-watch", daemon=True).start()


def _broadcast(obj, group):
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _connect_to_engine():
    from multiprocessing.connection import Client
    host, port = os.environ[ENGINE_ADDRESS_ENV].rsplit(":", 1)
    return Client((host, int(port)), authkey=bytes.fromhex(os.environ[ENGINE_KEY_ENV]))


def run_worker() -> None:
    """The worker's life: join the group, build the model shard, serve calls until "shutdown"."""
    conn = config = None
    if ENGINE_ADDRESS_ENV in os.environ:  # started by the engine on its host
        _die_with_parent()
    if os.environ["RANK"] == "0":
        conn = _connect_to_engine()
        config = recv_message(conn)
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    else:  # the host's cores shared by its ranks, not each rank using all of them
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", size))
        torch.set_num_threads(max(1, torch.get_num_threads() // local_ranks))
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", rank=rank, world_size=size)
    cpu_group = dist.new_group(backend="gloo") if cuda else dist.group.WORLD  # for picklable messages
    set_tensor_parallel(rank, size)
    try:
        config = _broadcast(config, cpu_group)
        if config.model.device.type == "cuda":
            config = dataclasses.replace(config, model=dataclasses.replace(
                config.model, device=torch.device("cuda", local_rank)))
        _serve(config, rank, conn, cpu_group)
    finally:
        dist.destroy_process_group()


def _serve(config: Config, rank: int, conn, cpu_group) -> None:
    from asyncserve.executor.uniproc import UniprocExecutor
    try:
        executor = UniprocExecutor(config)
    except Exception as exc:
        if conn is not None:
            send_message(conn, ("error", exc))
        raise
    if conn is not None:
        send_message(conn, ("ok", None))
    pending = None
    while True:
        call = _broadcast(recv_message(conn) if conn is not None else None, cpu_group)
        method, args = call
        if method == "shutdown":
            return
        try:
            if method == "determine_num_blocks":  # the pool is sized as the minimum over ranks
                blocks = torch.tensor([executor.determine_num_blocks()])
                dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=cpu_group)
                reply = int(blocks)
            elif method == "lora_shapes":
                reply = executor.lora_shapes()
            elif method == "bytes_per_block":
                reply = executor.bytes_per_block()
            elif method == "initialize_cache":
                reply = executor.initialize_cache(*args)
            elif method == "launch":
                pending = executor.launch(args[0])
                reply = None if pending.needs_grammar_masks else pending.result()
            elif method == "sample":
                executor.sample(pending, *args)
                reply = pending.result()
            else:
                raise ValueError(f"unknown call {method!r}")
        except Exception as exc:
            if conn is None:
                raise
            send_message(conn, ("error", exc))
            continue
        if conn is not None:
            send_message(conn, ("ok", reply))


if __name__ == "__main__":  # a rank on another host (torchrun sets the environment)
    run_worker()
