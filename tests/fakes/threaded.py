"""Serve an ASGI app over real HTTP from a thread (its own event loop), for tests that need real I/O."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import uvicorn
from starlette.types import ASGIApp

from deploykit.core.ports import free_port
from deploykit.serve.gateway.server import ConnectionLimits, server_config


@contextmanager
def serve_in_thread(
    app: ASGIApp | None = None,
    *,
    build: Callable[[], Awaitable[ASGIApp]] | None = None,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    limits: ConnectionLimits | None = None,
) -> Iterator[str]:
    """Serve `app` (or the app `build` makes inside the server's event loop, so that the clients it holds
    belong to that loop) on a free loopback port; yield its URL, and stop it afterwards (then await
    `on_stop` in that loop, to close those clients). With `limits`, it is served as `deploykit serve` serves
    the gateway (its connection limits, no websockets)."""
    port = free_port()

    async def make_app() -> ASGIApp:
        if build is not None:
            return await build()
        assert app is not None
        return app

    started = threading.Event()
    holder: dict[str, uvicorn.Server] = {}

    async def run() -> None:
        app = await make_app()
        if limits is not None:
            config = server_config(app, limits, drain_timeout_s=5, host="127.0.0.1", port=port)
        else:
            config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
        holder["server"] = server = uvicorn.Server(config)
        task = asyncio.ensure_future(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        started.set()
        await task
        if on_stop is not None:
            await on_stop()

    thread = threading.Thread(target=lambda: asyncio.run(run()), daemon=True)
    thread.start()
    assert started.wait(30), "the test server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        holder["server"].should_exit = True
        thread.join(30)
        time.sleep(0)  # let the loop's last callbacks run before the next test binds ports


@contextmanager
def raw_server(
    answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> Iterator[str]:
    """A bare TCP server on a loopback port and a thread of its own, calling `answer` for each connection:
    for engines that misbehave below HTTP (a socket closed mid-body, a request never answered)."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def start() -> asyncio.AbstractServer:
        return await asyncio.start_server(answer, "127.0.0.1", 0)

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(5)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)


async def read_request_head(reader: asyncio.StreamReader) -> None:
    """Read an HTTP request up to the blank line that ends its headers."""
    while (await reader.readline()) not in (b"\r\n", b""):
        pass


def nobody_listening() -> str:
    """The URL of a loopback port nobody listens on (an engine or endpoint that is gone)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"
