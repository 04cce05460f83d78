"""The FastAPI gateway: an OpenAI-compatible front for one or more engines, built by `create_app`.

Every model request goes through the same steps: body size, API key, model route and the key's scope,
max_tokens, quotas; then the engine answers and the Exchange records what the request used.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from deploykit import __version__
from deploykit.serve.gateway.auth import ApiKey, KeyVerifier, require_model_access
from deploykit.serve.gateway.database import Database
from deploykit.serve.gateway.errors import (
    GatewayError,
    error_body,
    error_response,
    install_error_handlers,
    unexpected_error_response,
)
from deploykit.serve.gateway.exchange import Exchange
from deploykit.serve.gateway.ledger import Ledger
from deploykit.serve.gateway.metrics import GatewayMetrics
from deploykit.serve.gateway.proxy import (
    CLIENT_CLOSED_REQUEST,
    forward,
    forward_spill,
    get_json,
    get_text,
    parse_body,
)
from deploykit.serve.gateway.ratelimit import RateLimiter, estimate_prompt_tokens
from deploykit.serve.gateway.routing import Backend, Router
from deploykit.serve.gateway.schema import install_openapi
from deploykit.serve.gateway.spill import SpillTarget


@dataclass(frozen=True)
class GatewayOptions:
    auth: bool = False  # require an API key on every model request
    max_body_bytes: int = 4 * 1024 * 1024
    max_tokens: int | None = None  # the most a request may ask for (None: the engine's own limit)
    spills: tuple[SpillTarget, ...] = ()  # managed endpoints that take over a model's overflow


class Gateway:
    """What the routes share: the engines, the keys, the quotas, the ledger and the metrics."""

    def __init__(self, backends: Sequence[Backend], db: Database, options: GatewayOptions) -> None:
        self.router = Router(backends)
        session = backends[0].session
        self.spills = {s.model: (s, Backend(s.model, s.url, session, status="ready")) for s in options.spills}
        self.options = options
        self.verifier = KeyVerifier(db)
        self.limiter = RateLimiter()
        self.ledger = Ledger(db)
        self.metrics = GatewayMetrics()

    def authenticate(self, request: Request) -> ApiKey | None:
        if not self.options.auth:
            return None
        return self.verifier.verify(request.headers.get("authorization"), request.headers.get("api-key"))

    def close(self) -> None:
        self.ledger.close()


async def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(_gateway)]


_PROXIED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


class GatewayApp(FastAPI):
    """FastAPI, except that the three proxied routes skip its router and middleware: each layer wraps
    every `send`, and a stream sends once per event. Same handler (_proxy), same error bodies."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in _PROXIED:
            request = Request(scope, receive)
            try:
                response = await _proxy(request, self.state.gateway, scope["path"])
            except GatewayError as e:
                response = error_response(e)
            except Exception as e:  # as the app's handler for unexpected errors answers
                response = unexpected_error_response(e)
            await response(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(backends: Sequence[Backend], db: Database, options: GatewayOptions | None = None) -> FastAPI:
    """The gateway app; `app.state.gateway.close()` flushes its ledger when the server has stopped."""
    app = GatewayApp(title="deploykit gateway", version=__version__)
    app.state.gateway = Gateway(backends, db, options or GatewayOptions())
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        """The gateway process is alive (whether or not an engine can serve)."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(gateway: GatewayDep) -> Response:
        """200 when every model has an engine that can serve, else 503 with each model's status."""
        models = gateway.router.models.values()
        status = {m.name: m.status for m in models}
        replicas = {m.name: {r.replica: r.status for r in m.replicas} for m in models}
        if all(s == "ready" for s in status.values()):
            return JSONResponse({"status": "ready", "models": status, "replicas": replicas})
        body = error_body("Not every model can serve yet.", "service_unavailable", "not_ready")
        return JSONResponse({**body, "models": status, "replicas": replicas}, status_code=503)

    @app.get("/version")
    async def version(gateway: GatewayDep) -> dict[str, object]:
        """deploykit's version and the engine's, as vLLM's own /version gives it (what a load test records)."""
        backend = next((b for b in gateway.router.replicas if b.status == "ready"), None)
        engine = await get_json(backend, "/version") if backend is not None else {}
        return {"version": engine.get("version"), "deploykit": __version__}

    @app.get("/metrics")
    async def metrics(gateway: GatewayDep) -> Response:
        """Prometheus metrics: the gateway's, then each engine's queue and KV-cache figures."""
        backends = gateway.router.replicas
        for b in backends:
            gateway.metrics.replica_up.labels(b.model, b.replica).set(1 if b.status == "ready" else 0)
        texts = await asyncio.gather(*(get_text(b, "/metrics") for b in backends if b.status == "ready"))
        ready = [b for b in backends if b.status == "ready"]
        engines = [(b.replica, text) for b, text in zip(ready, texts, strict=True) if text is not None]
        return Response(gateway.metrics.render(engines), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request, gateway: GatewayDep) -> dict[str, object]:
        key = gateway.authenticate(request)
        data: dict[str, object] = {}  # by id: an engine lists its LoRA adapters beside its model
        for model in gateway.router.models.values():
            backend = model.pick()
            if backend is None or model.name in data:
                continue
            listing = await get_json(backend, "/v1/models")
            for entry in listing.get("data", []):  # type: ignore[attr-defined]
                if isinstance(entry, dict) and entry.get("id") in gateway.router.models:
                    data.setdefault(entry["id"], entry)
        names = [name for name in data if key is None or key.allows(name)]
        return {"object": "list", "data": [data[name] for name in names]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, gateway: GatewayDep) -> Response:
        return await _proxy(request, gateway, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request, gateway: GatewayDep) -> Response:
        return await _proxy(request, gateway, "/v1/completions")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request, gateway: GatewayDep) -> Response:
        return await _proxy(request, gateway, "/v1/embeddings")

    install_openapi(app, list(app.state.gateway.router.models))
    return app


async def _proxy(request: Request, gateway: Gateway, path: str) -> Response:
    exchange: Exchange | None = None
    key: ApiKey | None = None
    name = ""
    try:
        raw = await _read_body(request, gateway.options.max_body_bytes)
        key = gateway.authenticate(request)
        body = parse_body(raw)
        name = body["model"] if isinstance(body.get("model"), str) else ""  # type: ignore[assignment]
        model = gateway.router.route(body)
        if key is not None:
            require_model_access(key, model.name)
        max_tokens = _max_tokens(body, gateway.options.max_tokens)
        _check_stream(body)
        admission = None
        if key is not None:
            admission = gateway.limiter.admit(key, estimate_prompt_tokens(len(raw)) + max_tokens)
        exchange = Exchange(
            gateway.ledger, gateway.metrics, gateway.limiter, path, model.name, key, admission, route=model
        )
        if body.get("stream") is True:
            body, exchange.strip_usage = _with_usage(body)
            if exchange.strip_usage:
                raw = json.dumps(body).encode()
        spill, spill_backend = gateway.spills.get(model.name, (None, None))
        if spill is not None and spill_backend is not None and spill.takes(model):
            exchange.spill = spill
            return await forward_spill(spill, spill_backend, path, spill.body(body), request, exchange)
        return await forward(model, path, raw, request, exchange)
    except GatewayError as e:
        if exchange is None:
            exchange = Exchange(gateway.ledger, gateway.metrics, gateway.limiter, path, name, key)
        await exchange.finish(e.status, e.code or e.type)
        raise
    except BaseException as e:  # the client went away, or a bug: the request is still settled and recorded
        if exchange is not None:
            gone = isinstance(e, asyncio.CancelledError)
            exchange.finish_nowait(CLIENT_CLOSED_REQUEST if gone else 500, type(e).__name__)
        raise


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"The request body is larger than this gateway's limit of {limit:,} bytes.",
        "invalid_request_error",
        "request_too_large",
    )


def _max_tokens(body: dict[str, object], limit: int | None) -> int:
    """The request's max_tokens (0 when it sets none), checked against the gateway's limit."""
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise GatewayError(
            400,
            f"max_tokens must be a positive integer (got {value!r}).",
            "invalid_request_error",
            "invalid_value",
            "max_tokens",
        )
    if limit is not None and value > limit:
        raise GatewayError(
            400,
            f"max_tokens is {value}; this gateway allows at most {limit}.",
            "invalid_request_error",
            "max_tokens_too_large",
            "max_tokens",
        )
    return value


def _check_stream(body: dict[str, object]) -> None:
    """The gateway reads these two fields to relay the answer; a wrong type is the client's error, not a
    question for the engine."""
    for field, kind, name in (("stream", bool, "a boolean"), ("stream_options", dict, "an object")):
        value = body.get(field)
        if value is not None and not isinstance(value, kind):
            raise GatewayError(400, f"{field} must be {name}.", "invalid_request_error", "invalid_type", field)


def _with_usage(body: dict[str, object]) -> tuple[dict[str, object], bool]:
    """Ask the engine for the usage chunk so the ledger counts tokens; True: the client did not ask, so the
    chunk is stripped on the way back."""
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return body, False
    options = dict(options) if isinstance(options, dict) else {}
    return {**body, "stream_options": {**options, "include_usage": True}}, True
