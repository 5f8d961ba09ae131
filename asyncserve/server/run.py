"""Serving an app until told to stop, draining while still listening: new clients get 503, not a refusal.

aiohttp's own runner closes the listening socket before the app's shutdown hooks run, so during the drain
a new connection would be refused; here the drain comes first (every new request is answered 503
`shutting_down` in OpenAI's shape), then the listener closes and the app is cleaned up. The listener bounds
its connections' number and idle time (server/listener.py).
"""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
from typing import Callable

from aiohttp import web

from asyncserve.server.listener import ConnectionLimits, LimitedSite, handler_options
from asyncserve.server.state import SERVER_STATE

logger = logging.getLogger("asyncserve")


async def serve(app: web.Application, host: str, port: int, *, sock: socket.socket | None = None,
                stop: asyncio.Event | None = None,
                access_log: logging.Logger | None = None, shutdown_timeout: float = 10.0,
                on_started: Callable[[list], None] | None = None,
                limits: ConnectionLimits = ConnectionLimits()) -> None:
    """Serves until `stop` is set (by default: SIGINT or SIGTERM), drains, then cleans up. `sock`, when
    given, is a socket already bound to host:port (the CLI binds it before the model loads)."""
    loop = asyncio.get_running_loop()
    signals = []
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
            signals.append(sig)
    if sock is None:
        sock = socket.create_server((host, port))
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=shutdown_timeout,
                           handle_signals=False, **handler_options(limits, access_log))
    await runner.setup()
    try:
        site = LimitedSite(runner, sock, limits, access_log)
        await site.start()
        if on_started is not None:
            on_started(runner.addresses)
        await stop.wait()
        if SERVER_STATE in app:
            await app[SERVER_STATE].drain()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await runner.cleanup()
