"""The FastAPI gateway: an OpenAI-compatible front for one or more engines, built by `create_app`.

Every model request goes through the same steps: body size, API key, model route and the key's scope,
max_tokens, quotas; then the engine answers and the Exchange records what the request used.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from deploykit import __version__
from deploykit.core.ports import is_loopback
from deploykit.serve.accounting.budgets import BudgetExceeded, BudgetKeeper, Hold, Price
from deploykit.serve.accounting.database import Database
from deploykit.serve.accounting.keys import PRIORITIES, ApiKey
from deploykit.serve.accounting.ledger import Ledger
from deploykit.serve.gateway.audio import AUDIO_PATHS, read_form
from deploykit.serve.gateway.auth import KeyVerifier, require_model_access
from deploykit.serve.gateway.errors import (
    GatewayError,
    error_body,
    error_response,
    install_error_handlers,
    unexpected_error_response,
)
from deploykit.serve.gateway.exchange import Exchange
from deploykit.serve.gateway.fairness import FairQueue
from deploykit.serve.gateway.metrics import GatewayMetrics
from deploykit.serve.gateway.proxy import (
    CLIENT_CLOSED_REQUEST,
    forward,
    forward_spill,
    get_json,
    get_text,
    parse_body,
)
from deploykit.serve.gateway.ratelimit import Admission, RateLimiter
from deploykit.serve.gateway.routing import Backend, Router, prefix_key
from deploykit.serve.gateway.schema import install_openapi
from deploykit.serve.gateway.shared_limits import SharedRateLimiter
from deploykit.serve.gateway.spill import SpillTarget
from deploykit.serve.gateway.tokens import TokenBudget, budget_tokens
from deploykit.serve.gateway.tracing import from_environment


@dataclass(frozen=True)
class GatewayOptions:
    auth: bool = False  # require an API key on every model request
    max_body_bytes: int = 4 * 1024 * 1024
    max_tokens: int | None = None  # the most a request may ask for (None: the engine's own limit)
    spills: tuple[SpillTarget, ...] = ()  # managed endpoints that take over a model's overflow
    # With auth on, /metrics, /docs, /openapi.json and /ready's details are for the operator: a client
    # that sends this token as a Bearer, or (when no token is set) one on loopback.
    metrics_token: str | None = field(default=None, repr=False)
    body_timeout_s: float = 60.0  # the whole request body must arrive within this (408 after)
    max_concurrent: int | None = None  # requests in flight to the engines at once, fair between keys
    queue_timeout_s: float = 30.0  # how long a request may wait for one of those slots (503 after)
    # Keys' quotas kept in the database, shared with every gateway using it (on for PostgreSQL in `serve`)
    shared_quotas: bool = False
    # The private addresses of the other gateway processes of `serve --workers N`, whose own figures /metrics
    # adds to this one's (serve/workers.py)
    peers: tuple[str, ...] = field(default=(), repr=False)
    # What a million prompt / completion tokens of each local model cost (serve --token-price): the ledger's
    # cost column and the keys' spend budgets use it
    token_prices: Mapping[str, Price] = field(default_factory=dict)
    # Models whose engines run with --scheduling-policy priority: requests carry their key's tier to vLLM
    priority_models: frozenset[str] = frozenset()
    prefix_routing: bool = False  # send requests that start alike to the same replica (routing.py)
    max_audio_bytes: int = 25 * 1024 * 1024  # an audio upload's body (OpenAI's limit for these routes)


class Gateway:
    """What the routes share: the engines, the keys, the quotas, the ledger and the metrics."""

    def __init__(self, backends: Sequence[Backend], db: Database, options: GatewayOptions) -> None:
        self.router = Router(backends, prefix_routing=options.prefix_routing)
        session = backends[0].session
        self.spills = {s.model: (s, Backend(s.model, s.url, session, status="ready")) for s in options.spills}
        self.peers = [Backend("gateway worker", url, session, status="ready") for url in options.peers]
        self.options = options
        self.verifier = KeyVerifier(db)
        self.limiter: RateLimiter | SharedRateLimiter = (
            SharedRateLimiter(db) if options.shared_quotas else RateLimiter()
        )
        self.ledger = Ledger(db)
        self.budgets = BudgetKeeper(db)
        self.metrics = GatewayMetrics()
        self.tracer = from_environment()  # None unless an OTLP endpoint is set: then spans per request
        self.queue = (
            FairQueue(options.max_concurrent, max_wait_s=options.queue_timeout_s) if options.max_concurrent else None
        )
        if self.queue is not None:
            queue = self.queue
            self.metrics.queued.set_function(lambda: queue.queued)
        self.stopping = asyncio.Event()  # set at the drain deadline: requests still running are cut short
        self.active = 0  # model requests being answered (streams included)
        self._idle = asyncio.Event()
        self._idle.set()

    def started(self) -> None:
        self.active += 1
        self._idle.clear()

    def ended(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Cut every request still running (each gets its error, its ledger row and an engine abort), wait for
        them to end, then commit the ledger off the event loop."""
        self.stopping.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        await asyncio.to_thread(self.close)

    def authenticate(self, request: Request) -> ApiKey | None:
        if not self.options.auth:
            return None
        return self.verifier.verify(request.headers.get("authorization"), request.headers.get("api-key"))

    def is_operator(self, request: Request) -> bool:
        """May this client see the gateway's insides (engine URLs, per-key counts, the served models' schema)?"""
        if not self.options.auth:
            return True
        token = self.options.metrics_token
        if token:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
        return request.client is not None and is_loopback(request.client.host)

    def require_operator(self, request: Request) -> None:
        if not self.is_operator(request):
            hint = "its metrics token as a Bearer" if self.options.metrics_token else "a request from this host"
            raise GatewayError(
                401,
                f"{request.url.path} is for the operator when API keys are on: it needs {hint}.",
                "invalid_request_error",
                "operator_only",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def admit(self, key: ApiKey, tokens: int, audio_s: float = 0.0) -> Admission:
        """Take the request from the key's quotas (shared ones in the database, off the event loop)."""
        if isinstance(self.limiter, SharedRateLimiter):
            return await asyncio.to_thread(self.limiter.admit, key, tokens, audio_s)
        return self.limiter.admit(key, tokens, audio_s)

    async def hold(
        self, key: ApiKey, model: str, budget: TokenBudget, body_bytes: int, audio: bool = False
    ) -> Hold | None:
        """Hold the request's worst-case cost against its key's spend budget (if it has one), or raise its 429."""
        if key.budget is None:
            return None
        price = None if audio else self.price(model)  # budgets price tokens; audio has no price here yet
        if price is None:
            raise GatewayError(
                403,
                f"The API key '{key.name}' has a spend budget, and this gateway has no price for '{model}' to hold "
                f"it to; the operator sets one with `deploykit serve --token-price {model}=IN/OUT`.",
                "permission_error",
                "budget_unpriced",
                "model",
            )
        if budget.reserve is None:
            raise _needs_max_tokens(f"The API key '{key.name}' has a spend budget")
        output = 0 if budget.max_tokens == 0 else budget.reserve  # no prompt token is shorter than a byte
        try:
            return await asyncio.to_thread(self.budgets.hold, key.budget, price.cost(body_bytes, output))
        except BudgetExceeded as e:
            raise GatewayError(
                429,
                f"{e} This request could cost up to ${e.usd:,.4f}; a lower max_tokens may fit.",
                "insufficient_quota",
                "budget_exceeded",
                headers={"Retry-After": str(max(1, math.ceil(e.state.window.resets_at - time.time())))},
            ) from e

    def price(self, model: str) -> Price | None:
        """The dearest a request to `model` can be priced at: here, or at its spill-over endpoint."""
        local = self.options.token_prices.get(model)
        spill = self.spills.get(model)
        if local is None:
            return None  # an unpriced local model: its requests cannot be held to a budget
        return local.dearer(spill[0].price if spill is not None else None)

    def close(self) -> None:
        """Commit every ledger row queued so far (and settle shared quotas), then stop the writers."""
        if isinstance(self.limiter, SharedRateLimiter):
            self.limiter.close()
        self.ledger.close()
        if self.tracer is not None:
            self.tracer.shutdown()  # the spans still batched go out


async def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(_gateway)]


_PROXIED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", *AUDIO_PATHS)
# The schema names the served models; the docs pages load it.
_OPERATOR_PAGES = ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")


class GatewayApp(FastAPI):
    """FastAPI, except that the three proxied routes skip its router and middleware: each layer wraps
    every `send`, and a stream sends once per event. Same handler (_proxy), same error bodies."""

    # uvicorn calls an app with no arguments to see whether it is a factory; this method must stay a plain
    # coroutine function for that (mutation testing would wrap it in one that accepts any arguments).
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # pragma: no mutate block
        await _dispatch(self, scope, receive, send)


async def _dispatch(app: GatewayApp, scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in _PROXIED:
        request = Request(scope, receive)
        gateway = app.state.gateway
        gateway.started()
        try:
            try:
                response = await _proxy(request, gateway, scope["path"])
            except GatewayError as e:
                response = error_response(e)
            except Exception as e:  # as the app's handler for unexpected errors answers
                response = unexpected_error_response(e)
            await response(scope, receive, send)
        finally:
            gateway.ended()
        return
    if scope["type"] == "http" and scope["path"] in _OPERATOR_PAGES:
        try:
            app.state.gateway.require_operator(Request(scope, receive))
        except GatewayError as e:
            await error_response(e)(scope, receive, send)
            return
    await FastAPI.__call__(app, scope, receive, send)


def create_app(backends: Sequence[Backend], db: Database, options: GatewayOptions | None = None) -> FastAPI:
    """The gateway app; `app.state.gateway.close()` flushes its ledger when the server has stopped."""
    # redirect_slashes=False: a redirect for "/v1/models/" would be built from the client's Host header
    app = GatewayApp(title="deploykit gateway", version=__version__, redirect_slashes=False)
    app.state.gateway = Gateway(backends, db, options or GatewayOptions())
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        """The gateway process is alive (whether or not an engine can serve)."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request, gateway: GatewayDep) -> Response:
        """200 when every model has an engine that can serve, else 503; each model's and replica's status,
        and how each replica's last start went, for the operator (with API keys on, others get the verdict only)."""
        models = gateway.router.models.values()
        status = {m.name: m.status for m in models}
        detail: dict[str, object] = {}
        if gateway.is_operator(request):
            detail = {
                "models": status,
                "replicas": {m.name: {r.replica: r.status for r in m.replicas} for m in models},
                "startup": {m.name: {r.replica: r.startup for r in m.replicas if r.startup} for m in models},
            }
        if all(s == "ready" for s in status.values()):
            return JSONResponse({"status": "ready", **detail})
        body = error_body("Not every model can serve yet.", "service_unavailable", "not_ready")
        return JSONResponse({**body, "status": "not_ready", **detail}, status_code=503)

    @app.get("/version")
    async def version(request: Request, gateway: GatewayDep) -> dict[str, object]:
        """deploykit's version and the engine's, as vLLM's own /version gives it (what a load test records)."""
        gateway.authenticate(request)
        backend = next((b for b in gateway.router.replicas if b.status == "ready"), None)
        engine = await get_json(backend, "/version") if backend is not None else {}
        return {"version": engine.get("version"), "deploykit": __version__}

    @app.get("/metrics")
    async def metrics(request: Request, gateway: GatewayDep) -> Response:
        """Prometheus metrics: the gateway's, then each engine's queue and KV-cache figures."""
        gateway.require_operator(request)
        backends = gateway.router.replicas
        for b in backends:
            gateway.metrics.replica_up.labels(b.model, b.replica).set(1 if b.status == "ready" else 0)
        ready = [b for b in backends if b.status == "ready"]
        texts = await asyncio.gather(*(get_text(b, "/metrics") for b in ready))
        engines = [(b.replica, text) for b, text in zip(ready, texts, strict=True) if text is not None]
        peers = [t for t in await asyncio.gather(*(get_text(p, "") for p in gateway.peers)) if t is not None]
        shared = await asyncio.to_thread(gateway.budgets.exposition) if gateway.options.auth else ""
        page = gateway.metrics.render(engines, peers, shared)
        return Response(page, media_type="text/plain; version=0.0.4; charset=utf-8")

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

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request, gateway: GatewayDep) -> Response:
        return await _proxy(request, gateway, "/v1/audio/transcriptions")

    @app.post("/v1/audio/translations")
    async def translations(request: Request, gateway: GatewayDep) -> Response:
        return await _proxy(request, gateway, "/v1/audio/translations")

    install_openapi(app, list(app.state.gateway.router.models))
    return app


async def _proxy(request: Request, gateway: Gateway, path: str) -> Response:
    arrived = time.monotonic()
    exchange: Exchange | None = None
    key: ApiKey | None = None
    name = ""
    try:
        audio_path = path in AUDIO_PATHS
        limit = gateway.options.max_audio_bytes if audio_path else gateway.options.max_body_bytes
        raw = await _read_body(request, limit, gateway.options.body_timeout_s)
        key = gateway.authenticate(request)
        audio = await read_form(raw, request.headers.get("content-type")) if audio_path else None
        body: dict[str, object] = {"model": audio.model} if audio is not None else parse_body(raw)
        name = body["model"] if isinstance(body.get("model"), str) else ""  # type: ignore[assignment]
        model = gateway.router.route(body)
        if key is not None:
            require_model_access(key, model.name)
        if audio is None:
            budget = budget_tokens(body, path, len(raw), limit=gateway.options.max_tokens, context=model.context)
            _check_stream(body)
        else:
            budget = TokenBudget(0, 0)  # the audio quota counts seconds; the answer's tokens are not counted
        admission = hold = None
        if key is not None:
            hold = await gateway.hold(key, model.name, budget, len(raw), audio is not None)
            try:
                admission = await gateway.admit(key, _reservation(budget, key), audio.seconds if audio else 0.0)
            except BaseException:
                if hold is not None:
                    await asyncio.to_thread(gateway.budgets.release, hold)
                raise
        exchange = Exchange(
            gateway.ledger,
            gateway.metrics,
            gateway.limiter,
            path,
            model.name,
            key,
            admission,
            route=model,
            tracer=gateway.tracer,
            arrived=arrived,
            traceparent=request.headers.get("traceparent") if gateway.tracer is not None else None,
            price=gateway.options.token_prices.get(model.name),
            hold=hold,
            budgets=gateway.budgets,
            audio_seconds=audio.seconds if audio is not None else None,
        )
        tier = key.priority if key is not None else "normal"
        if audio is None:  # an audio form is relayed as it came: it is the engine's to read
            rewritten = budget.inject is not None
            if rewritten:
                body = {**body, "max_tokens": budget.inject}
            scheduled = model.name in gateway.options.priority_models
            if "priority" in body or (scheduled and tier != "normal"):  # no client sets its own place in line
                body, rewritten = _with_priority(body, tier, scheduled), True
            if body.get("stream") is True:
                body, exchange.strip_usage = _with_usage(body)
                rewritten = rewritten or exchange.strip_usage
            if rewritten:
                raw = json.dumps(body).encode()
            spill, spill_backend = gateway.spills.get(model.name, (None, None))
            if spill is not None and spill_backend is not None and spill.takes(model):
                exchange.spill = spill
                return await forward_spill(
                    spill, spill_backend, path, spill.body(body), request, exchange, gateway.stopping
                )
        if gateway.queue is not None:
            exchange.slot = await gateway.queue.acquire(key.id if key is not None else "", tier)
            exchange.queued = time.monotonic()
        ring_key = prefix_key(body) if model.prefix_routing and audio is None else None
        return await forward(model, path, raw, request, exchange, gateway.stopping, ring_key)
    except GatewayError as e:
        if exchange is None:
            exchange = _rejected(gateway, path, name, key, arrived)
        await exchange.finish(e.status, e.code or e.type)
        raise
    except ClientDisconnect:  # the client left while sending its body: nobody hears an answer
        if exchange is None:
            exchange = _rejected(gateway, path, name, key, arrived)
        exchange.finish_nowait(CLIENT_CLOSED_REQUEST, "client disconnected")
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except BaseException as e:  # the client went away, or a bug: the request is still settled and recorded
        if exchange is not None:
            gone = isinstance(e, asyncio.CancelledError)
            exchange.finish_nowait(CLIENT_CLOSED_REQUEST if gone else 500, type(e).__name__)
        raise


def _rejected(gateway: Gateway, path: str, name: str, key: ApiKey | None, arrived: float) -> Exchange:
    """The accounting of a request refused before it was routed: its metrics say "unknown" unless it named
    a served model (labels never carry what a client made up), its ledger row what it asked for."""
    label = name if name in gateway.router.models else "unknown"
    return Exchange(
        gateway.ledger,
        gateway.metrics,
        gateway.limiter,
        path,
        name[:64],
        key,
        label=label,
        tracer=gateway.tracer,
        arrived=arrived,
    )


def _reservation(budget: TokenBudget, key: ApiKey) -> int:
    if budget.reserve is None and key.tpm is not None:
        raise _needs_max_tokens(f"The API key '{key.name}' has a tokens-per-minute limit")
    return budget.reserve or 0


def _needs_max_tokens(why: str) -> GatewayError:
    message = f"{why}, and this request sets no max_tokens."
    return GatewayError(400, message, "invalid_request_error", "max_tokens_required", "max_tokens")


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
    except TimeoutError as e:
        raise GatewayError(
            408, f"The request body did not arrive within {timeout_s:g} s.", "invalid_request_error", "request_timeout"
        ) from e
    return b"".join(chunks)


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"The request body is larger than this gateway's limit of {limit:,} bytes.",
        "invalid_request_error",
        "request_too_large",
    )


def _check_stream(body: dict[str, object]) -> None:
    """The gateway reads these two fields to relay the answer; a wrong type is the client's error, not a
    question for the engine."""
    for attr, kind, name in (("stream", bool, "a boolean"), ("stream_options", dict, "an object")):
        value = body.get(attr)
        if value is not None and not isinstance(value, kind):
            raise GatewayError(400, f"{attr} must be {name}.", "invalid_request_error", "invalid_type", attr)


def _with_priority(body: dict[str, object], tier: str, scheduled: bool) -> dict[str, object]:
    """The body with vLLM's `priority` set from the key's tier where the engines schedule by priority, and
    without whatever the client sent (elsewhere a non-zero value is an engine error)."""
    clean = {k: v for k, v in body.items() if k != "priority"}
    return {**clean, "priority": PRIORITIES[tier]} if scheduled and tier != "normal" else clean


def _with_usage(body: dict[str, object]) -> tuple[dict[str, object], bool]:
    """Ask the engine for the usage chunk so the ledger counts tokens; True: the client did not ask, so the
    chunk is stripped on the way back."""
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return body, False
    options = dict(options) if isinstance(options, dict) else {}
    return {**body, "stream_options": {**options, "include_usage": True}}, True
