"""The wire between the engine and tensor-parallel rank 0, which both sides import: where rank 0 finds the
engine, the key that proves the connection is the engine's own, and how a message crosses."""
from __future__ import annotations

import pickle

ENGINE_ADDRESS_ENV = "ASYNCSERVE_ENGINE_ADDRESS"
ENGINE_KEY_ENV = "ASYNCSERVE_ENGINE_KEY"


def send_message(conn, obj) -> None:
    """Plain pickling: multiprocessing's own would pass tensors as shared-memory handles, which only
    processes of one multiprocessing family can open (and never a host away)."""
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def recv_message(conn):
    return pickle.loads(conn.recv_bytes())
