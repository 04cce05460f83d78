"""Forward one OpenAI request to an engine and relay its answer, streamed chunk by chunk when it streams.

The engine's own OpenAI server does the work; the proxy passes the request body through untouched and
relays the response bytes as they arrive. A client that goes away closes the engine connection, which
makes vLLM abort the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from deploykit.serve.gateway.errors import GatewayError
from deploykit.serve.gateway.exchange import DONE_EVENT, Exchange

# Request headers worth passing to the engine, and response headers worth passing back.
_REQUEST_HEADERS = ("content-type", "accept", "x-request-id")
_RESPONSE_HEADERS = ("x-request-id",)
# nginx's status for a request whose client went away before the answer; nobody receives it.
CLIENT_CLOSED_REQUEST = 499
_EVENT_END = re.compile(rb"\r?\n\r?\n")

T = TypeVar("T")


@dataclass
class Backend:
    """One engine serving one model name. `status` is kept current by whoever runs the engine."""

    model: str
    client: httpx.AsyncClient  # base_url is the engine's loopback address
    status: str = "starting"  # starting | ready | stopped

    @property
    def replica(self) -> str:
        return str(self.client.base_url).rstrip("/")

    def require_ready(self) -> None:
        if self.status == "ready":
            return
        if self.status == "starting":
            message = f"The engine for '{self.model}' is still starting; GET /ready says when it can serve."
        else:
            message = f"The engine for '{self.model}' has stopped; the gateway cannot serve it."
        raise GatewayError(503, message, "service_unavailable", "engine_unavailable")


def parse_body(raw: bytes) -> dict[str, object]:
    """The request's JSON object, or a 400 that says what is wrong with it."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GatewayError(400, f"The request body is not valid JSON: {e}.", "invalid_request_error") from e
    if not isinstance(body, dict):
        raise GatewayError(400, "The request body must be a JSON object.", "invalid_request_error")
    return body


async def forward(backend: Backend, path: str, raw: bytes, request: Request, exchange: Exchange) -> Response:
    """Send the request to the engine and relay its answer, accounting for it in `exchange` on the way."""
    backend.require_ready()
    exchange.replica = backend.replica
    headers = {k: v for k in _REQUEST_HEADERS if (v := request.headers.get(k))}
    upstream_request = backend.client.build_request("POST", path, content=raw, headers=headers)
    try:
        # A non-streaming engine answer sends its headers only when generation ends, so the client may
        # leave while we still wait for them: cancelling the exchange then aborts it at the engine.
        upstream = await _unless_client_leaves(request, backend.client.send(upstream_request, stream=True))
        if upstream is None:
            exchange.finish_nowait(CLIENT_CLOSED_REQUEST, "client disconnected")
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        relayed = {k: v for k in _RESPONSE_HEADERS if (v := upstream.headers.get(k))}
        if exchange.admission is not None:
            relayed |= exchange.admission.headers
        media_type = upstream.headers.get("content-type", "application/json")
        if media_type.startswith("text/event-stream"):
            return StreamingResponse(
                _relay(upstream, exchange), status_code=upstream.status_code, media_type=media_type, headers=relayed
            )
        try:
            content = await _unless_client_leaves(request, upstream.aread())
        finally:
            await upstream.aclose()
    except httpx.TransportError as e:
        raise _unreachable(backend, e) from e
    if content is None:
        exchange.finish_nowait(CLIENT_CLOSED_REQUEST, "client disconnected")
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    exchange.observe_body(content)
    await exchange.finish(upstream.status_code, None if upstream.status_code < 400 else "engine error")
    return Response(content, status_code=upstream.status_code, media_type=media_type, headers=relayed)


async def get_json(backend: Backend, path: str) -> dict[str, object]:
    backend.require_ready()
    try:
        response = await backend.client.get(path)
    except httpx.TransportError as e:
        raise _unreachable(backend, e) from e
    result: dict[str, object] = response.json()
    return result


async def get_text(backend: Backend, path: str) -> str | None:
    """A GET answer's text, or None when the engine cannot answer (for best-effort scrapes)."""
    try:
        response = await backend.client.get(path, timeout=2.0)
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None


async def _relay(upstream: httpx.Response, exchange: Exchange) -> AsyncIterator[bytes]:
    """Relay SSE events as they arrive, accounting for each; the ledger row is committed before [DONE] is sent.

    A stream the engine cuts short ends with an error event; a client that leaves closes the engine
    connection, which aborts the request there.
    """
    status, error = upstream.status_code, None
    pending = b""
    try:
        async for chunk in upstream.aiter_raw():
            *events, pending = _EVENT_END.split(pending + chunk)
            out = []
            for event in events:
                if event == DONE_EVENT:
                    await exchange.finish(status)
                if exchange.observe_event(event):
                    out.append(event + b"\n\n")
            if out:
                yield b"".join(out)
    except httpx.TransportError as e:
        status, error = 502, f"engine stopped mid-stream ({type(e).__name__})"
        body = {
            "error": {
                "message": f"The engine stopped mid-stream ({type(e).__name__}).",
                "type": "server_error",
                "param": None,
                "code": "engine_unavailable",
            }
        }
        yield f"data: {json.dumps(body)}\n\n".encode()
    except BaseException:  # the client went away (the response task is cancelled)
        status, error = CLIENT_CLOSED_REQUEST, "client disconnected"
        raise
    finally:
        await upstream.aclose()  # on client disconnect too: closing the connection aborts it at the engine
        exchange.finish_nowait(status, error or ("stream ended without [DONE]" if not exchange.finished else None))


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T | None:
    """Await `work`, but cancel it and return None if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _unreachable(backend: Backend, e: Exception) -> GatewayError:
    return GatewayError(
        503,
        f"The engine for '{backend.model}' did not answer ({type(e).__name__}); it may have stopped.",
        "service_unavailable",
        "engine_unavailable",
    )
