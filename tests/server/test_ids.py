"""Response and tool-call ids: unique, uuid-shaped, and made without a system call on the event loop."""
from __future__ import annotations

import os
import re
import threading

from asyncserve.server.chat_output import tool_call_id
from asyncserve.server.state import ServerState
from asyncserve.utils.ids import random_hex_id


def test_ids_are_unique_hex_of_uuid_length_across_threads():
    seen: list[str] = []

    def make() -> None:
        seen.extend(random_hex_id() for _ in range(2000))

    threads = [threading.Thread(target=make) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(seen)) == len(seen) == 8000
    assert all(re.fullmatch("[0-9a-f]{32}", value) for value in seen)


def test_no_request_id_reads_os_urandom(monkeypatch):
    """os.urandom releases the GIL; taking it back on the loop waited up to 5 ms per request under load."""
    def refuse(_):
        raise AssertionError("os.urandom on the request path")

    monkeypatch.setattr(os, "urandom", refuse)
    assert re.fullmatch("cmpl-[0-9a-f]{32}", ServerState.new_id("cmpl"))
    assert re.fullmatch("chatcmpl-tool-[0-9a-f]{32}", tool_call_id())
