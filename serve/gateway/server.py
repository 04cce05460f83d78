"""The HTTP server around the gateway app: uvicorn's httptools protocol with the limits it lacks.

uvicorn bounds neither the size of a request's headers nor the time a client may take to send them, nor
the number of open connections: four clients with unfinished 16 MB headers doubled the gateway's memory,
and idle or one-byte-a-second connections were held as long as the client liked. Here every connection
must send its request line and headers within `header_timeout_s`, in at most `max_header_bytes` (431
above, measured before parsing, so a header that never ends is cut too), idles at most `idle_timeout_s`
between requests, and past `max_connections` open ones a new connection gets a 503 and is closed.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, ClassVar

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int = 32 * 1024  # request line and headers together, as nginx's default buffers
    header_timeout_s: float = 15.0  # from the connection (or the request's first byte) to its last header
    idle_timeout_s: float = 15.0  # a kept-alive connection with no request; longer than clients' own 5 s
    max_connections: int = 2048  # open at once; more are answered 503 and closed
    body_timeout_s: float = 60.0  # the whole request body (enforced by the app: it reads the body)


def server_config(app: ASGIApp, limits: ConnectionLimits, *, drain_timeout_s: float, **more: Any) -> uvicorn.Config:
    """uvicorn's config for the gateway: the limited protocol, no websockets, no lifespan. Its own graceful
    shutdown is only a backstop: the runner cuts what is left at the drain deadline itself."""
    return uvicorn.Config(
        app,
        http=_limited_protocol(limits),  # type: ignore[arg-type]  # a protocol class, as uvicorn accepts
        ws="none",
        lifespan="off",
        log_level="warning",
        server_header=False,
        timeout_keep_alive=int(max(1, limits.idle_timeout_s)),
        timeout_graceful_shutdown=int(drain_timeout_s) + 5,
        **more,
    )


def _limited_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    return type("LimitedHttpProtocol", (LimitedHttpProtocol,), {"limits": limits})


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above; `_limited_protocol` binds a `ConnectionLimits`."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    _raw_header_bytes = 0  # bytes received while a request's headers were incomplete (catches endless ones)
    _header_bytes = 0  # the request line and headers as parsed (catches big ones that arrive whole)
    _in_headers = True
    _message_started = False
    _refused = False
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, "The gateway has too many open connections; retry shortly.", "too_many_connections")
            return
        self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_headers:
            self._raw_header_bytes += len(data)
        super().data_received(data)
        if not self._refused and self._in_headers and self._raw_header_bytes > self.limits.max_header_bytes:
            self._headers_too_large()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = self._message_started = True
        self._header_bytes = 0
        if self._header_timer is None:
            self._start_header_timer()

    def on_url(self, url: bytes) -> None:
        self._header_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._raw_header_bytes = 0
        self._stop_header_timer()
        if self._header_bytes > self.limits.max_header_bytes:
            self._headers_too_large()
            return  # no request task is started
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()

    def _start_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._headers_too_slow)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_large(self) -> None:
        message = (
            f"The request's headers are larger than this gateway's limit of {self.limits.max_header_bytes:,} bytes."
        )
        self._refuse(431, message, "headers_too_large")

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._refused or self.transport.is_closing():
            return
        if self._message_started:
            message = f"The request's headers did not arrive within {self.limits.header_timeout_s:g} s."
            self._refuse(408, message, "request_timeout")
        else:  # a connection that never sent a request: nobody to tell
            self._refused = True
            self.transport.close()

    def _refuse(self, status: int, message: str, code: str) -> None:
        self._refused = True
        self._stop_header_timer()
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
        body = json.dumps({"error": error}).encode()
        head = f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
        head += f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        self.transport.write(head.encode() + body)
        self.transport.close()


_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}
