"""Forward one OpenAI request to an engine and relay its answer, streamed event by event when it streams.

The engine's own OpenAI server does the work; the proxy passes the request body through untouched and
relays the response bytes as they arrive. A client that goes away closes the engine connection, which
makes vLLM abort the request.

The engine side is aiohttp (its C HTTP parser and connection pool stay cheap at hundreds of streams,
where httpx's pool scans every connection per request), and a stream goes back through a small ASGI
response that sends each batch of events as it comes, with one watcher task for the client leaving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

import aiohttp
from fastapi import Request
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from deploykit.serve.gateway.errors import GatewayError
from deploykit.serve.gateway.exchange import DONE_EVENT, Exchange
from deploykit.serve.gateway.routing import Backend, Model, unavailable
from deploykit.serve.gateway.spill import SpillTarget

# Request headers worth passing to the engine, and response headers worth passing back.
_REQUEST_HEADERS = ("content-type", "accept", "x-request-id")
_RESPONSE_HEADERS = ("x-request-id",)
# Answers come back uncompressed: the gateway reads their usage, and relays bytes whose encoding the client
# was told (a server that compresses anyway is decoded by the client session).
_IDENTITY = {"accept-encoding": "identity"}
# nginx's status for a request whose client went away before the answer; nobody receives it.
CLIENT_CLOSED_REQUEST = 499
_EVENT_END = re.compile(rb"\r?\n\r?\n")
# How deeply a request body's JSON may nest. OpenAI bodies nest a few levels (a tool's JSON schema a few
# dozen); the bound is explicit so that what is accepted does not depend on the stack the parser runs on,
# and far under Python's recursion limit, so the engine (a Python server too) can parse whatever passes.
MAX_JSON_DEPTH = 128

T = TypeVar("T")


def engine_session(read_timeout_s: float = 600.0) -> aiohttp.ClientSession:
    """The HTTP client for talking to engines (create it inside the running event loop)."""
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=read_timeout_s)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


def parse_body(raw: bytes) -> dict[str, object]:
    """The request's JSON object, or a 400 that says what is wrong with it."""
    too_deep = f"The request body's JSON is nested more than {MAX_JSON_DEPTH} levels deep."
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GatewayError(400, f"The request body is not valid JSON: {e}.", "invalid_request_error") from e
    except RecursionError as e:  # deeper than the bound, whatever the stack it was parsed on
        raise GatewayError(400, too_deep, "invalid_request_error") from e
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _deeper_than(body, MAX_JSON_DEPTH):
        raise GatewayError(400, too_deep, "invalid_request_error")
    if not isinstance(body, dict):
        raise GatewayError(400, "The request body must be a JSON object.", "invalid_request_error")
    return body


def _deeper_than(value: object, limit: int) -> bool:
    """Whether a parsed JSON value nests arrays and objects more than `limit` deep (without recursing)."""
    stack = [(value, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


async def forward(
    model: Model,
    path: str,
    raw: bytes,
    request: Request,
    exchange: Exchange,
    stopping: asyncio.Event,
    key: int | None = None,
) -> Response:
    """Send the request to the replica the model picks (by the prompt prefix's `key` with prefix routing, else
    the least busy) and relay its answer, accounting for it in `exchange`. A replica that fails before
    answering anything is left for the next one. When `stopping` is set (the gateway's drain deadline),
    whatever is still running is cut short and aborted."""
    tried: list[Backend] = []
    while (backend := model.pick(tried, key)) is not None:
        tried.append(backend)
        try:
            return await _forward_to(backend, backend.url + path, raw, request, exchange, stopping)
        except aiohttp.ClientError as e:  # nothing reached the client yet: another replica may answer
            if model.pick(tried, key) is None:
                raise _unreachable(backend, e) from e
    raise unavailable(model)


async def forward_spill(
    target: SpillTarget,
    backend: Backend,
    path: str,
    raw: bytes,
    request: Request,
    exchange: Exchange,
    stopping: asyncio.Event,
) -> Response:
    """Send the request to the managed endpoint that stands in for the local model."""
    try:
        return await _forward_to(backend, target.endpoint(path), raw, request, exchange, stopping, target.headers())
    except aiohttp.ClientError as e:
        raise _unreachable(backend, e) from e


async def _forward_to(
    backend: Backend,
    url: str,
    raw: bytes,
    request: Request,
    exchange: Exchange,
    stopping: asyncio.Event,
    extra_headers: Mapping[str, str] | None = None,
) -> Response:
    exchange.replica = backend.replica
    headers = {k: v for k in _REQUEST_HEADERS if (v := request.headers.get(k))} | _IDENTITY | dict(extra_headers or {})
    backend.outstanding += 1
    streaming = False
    try:
        # A non-streaming engine answer sends its headers only when generation ends, so the client may
        # leave while we still wait for them: cancelling the exchange then aborts it at the engine.
        try:
            upstream = await _interruptible(request, backend.session.post(url, data=raw, headers=headers), stopping)
        except _ClientGone:
            exchange.finish_nowait(CLIENT_CLOSED_REQUEST, "client disconnected")
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        relayed = {k: v for k in _RESPONSE_HEADERS if (v := upstream.headers.get(k))}
        if exchange.admission is not None:
            relayed |= exchange.admission.headers
        if exchange.hold is not None:
            relayed |= exchange.hold.headers
        media_type = upstream.headers.get("content-type", "application/json")
        if media_type.startswith("text/event-stream"):
            streaming = True  # the stream releases the replica when it ends
            return RelayedStream(upstream, backend, exchange, media_type, relayed, stopping)
        try:
            content = await _interruptible(request, upstream.read(), stopping)
        except _ClientGone:
            upstream.close()  # closing the connection aborts the request at the engine
            exchange.finish_nowait(CLIENT_CLOSED_REQUEST, "client disconnected")
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except BaseException:
            upstream.close()
            raise
    finally:
        if not streaming:
            backend.outstanding -= 1
    upstream.release()  # the connection goes back to the pool
    exchange.observe_body(content)
    await exchange.finish(upstream.status, None if upstream.status < 400 else "engine error")
    return Response(content, status_code=upstream.status, media_type=media_type, headers=relayed)


class RelayedStream(Response):
    """An engine's SSE answer relayed event by event; the ledger row is committed before [DONE] is sent.

    A stream the engine cuts short ends with an error event. A client that leaves cancels the relay,
    which closes the engine connection: the engine aborts the request. At the drain deadline (`stopping`)
    the relay is cancelled the same way and the client gets an error event saying the gateway stopped.
    """

    def __init__(
        self,
        upstream: aiohttp.ClientResponse,
        backend: Backend,
        exchange: Exchange,
        media_type: str,
        headers: Mapping[str, str],
        stopping: asyncio.Event,
    ) -> None:
        # no Response.__init__: it would declare a content-length for the empty body
        self.status_code = upstream.status
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)
        self.upstream = upstream
        self.backend = backend
        self.exchange = exchange
        self.stopping = stopping
        self.cut = False  # set when the drain deadline, not the client, ended the relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        relay = asyncio.ensure_future(self._relay(send))
        gone = asyncio.ensure_future(_wait_for_disconnect(receive))
        stop = asyncio.ensure_future(self.stopping.wait())
        done: set[asyncio.Future[Any]] = set()
        try:
            done, _ = await asyncio.wait([relay, gone, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            stop.cancel()
            if not relay.done():  # the client left, or the gateway is stopping
                self.cut = gone not in done
                relay.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await relay
        if self.cut:
            event = _error_event("The gateway is shutting down; this answer was cut short.", "shutting_down")
            await send({"type": "http.response.body", "body": event})  # the response's last message
        elif not relay.cancelled():
            relay.result()  # an error of the relay's own is raised here, for the server to log

    async def _relay(self, send: Send) -> None:
        exchange, upstream = self.exchange, self.upstream
        status, error, complete, tail = upstream.status, None, False, b""
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        pending = b""
        try:
            async for chunk in upstream.content.iter_any():
                *events, pending = _EVENT_END.split(pending + chunk)
                out = []
                for event in events:
                    if event == DONE_EVENT:
                        await exchange.finish(status)
                    if exchange.observe_event(event):
                        out.append(event + b"\n\n")
                if out:
                    await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
            complete = True
        except aiohttp.ClientError as e:
            status, error = 502, f"engine stopped mid-stream ({type(e).__name__})"
            tail = _error_event(f"The engine stopped mid-stream ({type(e).__name__}).", "engine_unavailable")
        except BaseException:  # the client went away, or the drain deadline passed (the relay is cancelled)
            status, error = (503, "gateway shut down mid-stream") if self.cut else (499, "client disconnected")
            raise
        finally:
            self.backend.outstanding -= 1
            if complete:
                upstream.release()  # the connection goes back to the pool
            else:
                upstream.close()  # on client disconnect too: closing the connection aborts it at the engine
            exchange.finish_nowait(status, error or ("stream ended without [DONE]" if not exchange.finished else None))
        await send({"type": "http.response.body", "body": tail})  # the response's last message


async def get_json(backend: Backend, path: str) -> dict[str, object]:
    try:
        async with backend.session.get(backend.url + path) as response:
            result: dict[str, object] = await response.json(content_type=None)
    except aiohttp.ClientError as e:
        raise _unreachable(backend, e) from e
    return result


async def get_text(backend: Backend, path: str) -> str | None:
    """A GET answer's text, or None when the engine cannot answer (for best-effort scrapes)."""
    try:
        async with backend.session.get(backend.url + path, timeout=aiohttp.ClientTimeout(total=2.0)) as response:
            return await response.text() if response.status == 200 else None
    except (aiohttp.ClientError, TimeoutError):
        return None


class _ClientGone(Exception):
    """The client disconnected while the gateway waited for the engine."""


async def _interruptible(request: Request, work: Awaitable[T], stopping: asyncio.Event) -> T:
    """Await `work`; cancel it (which aborts it at the engine) and raise _ClientGone if the client disconnects
    first, or the 503 for a gateway that is shutting down if the drain deadline passes first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    stop = asyncio.ensure_future(stopping.wait())
    done: set[asyncio.Future[Any]] = set()
    try:
        done, _ = await asyncio.wait([task, gone, stop], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        stop.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task in done:
        return task.result()
    if gone in done:
        raise _ClientGone
    raise GatewayError(
        503, "The gateway is shutting down; the request was cut short.", "service_unavailable", "shutting_down"
    )


def _error_event(message: str, code: str) -> bytes:
    """An SSE event in OpenAI's error shape: how a stream that cannot finish tells the client why."""
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return f"data: {json.dumps(body)}\n\n".encode()


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _unreachable(backend: Backend, e: Exception) -> GatewayError:
    return GatewayError(
        503,
        f"The engine for '{backend.model}' did not answer ({type(e).__name__}); it may have stopped.",
        "service_unavailable",
        "engine_unavailable",
    )
