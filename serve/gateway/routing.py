"""Which engine answers a request: the model named in the body, then one of that model's ready replicas.

By default the least busy one. With prefix routing (`serve --routing prefix`), the one most likely to hold
the request's prompt prefix in its KV cache: the prompt's start (a chat's messages to the first user
message, which every turn of a conversation repeats; a completion prompt's first PREFIX_BYTES) is hashed
onto a ring of the replicas (consistent hashing, 64 points each),
and the request goes to the first replica clockwise whose requests outstanding are within LOAD_BOUND of
the fair share (bounded loads), so requests that start alike (one conversation's turns, one system
prompt) meet on one engine until it is busier than the others. The mapping is the same in every gateway
process (no shared state), and a replica that comes or goes moves only its own share of prefixes. A
request with no prompt text goes to the least busy replica.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import aiohttp

from deploykit.serve.gateway.errors import GatewayError


@dataclass(eq=False)
class Backend:
    """One engine (a replica) serving one model name. `status` is kept current by whoever runs the engine."""

    model: str
    url: str  # the engine's base URL, e.g. http://127.0.0.1:8001
    session: aiohttp.ClientSession
    status: str = "starting"  # starting | ready | stopped
    outstanding: int = 0  # requests sent to it and not yet answered in full
    adapters: tuple[str, ...] = ()  # LoRA adapters it also serves, each a model name of its own
    runtime_adapters: tuple[str, ...] = ()  # adapters the gateway loaded into it at run time (lora.py)
    context: int | None = None  # the engine's --max-model-len (prompt and answer together)
    startup: Mapping[str, object] | None = None  # how its last start went (seconds per phase), for /ready

    @property
    def replica(self) -> str:
        return self.url.rstrip("/")


PREFIX_BYTES = 512  # of a completion prompt (about 128 tokens: eight of vLLM's 16-token KV blocks)
OPENING_BYTES = 64 * 1024  # of a chat's opening read at most
LOAD_BOUND = 1.25  # a replica may hold this many times its fair share of requests outstanding (plus one)
_POINTS = 64  # places on the ring per replica


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def prefix_key(body: Mapping[str, object]) -> int | None:
    """The ring position of the request's prompt prefix, or None when it has no prompt text. For chat, the
    messages up to the first user message, whole: the system prompt and the opening question, which every
    turn of a conversation repeats, and which tell conversations that share a long system prompt apart (each
    replica caches that prompt once; the conversations spread). For completions, the prompt's first
    PREFIX_BYTES."""
    parts: list[str] = []
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            texts = [content] if isinstance(content, str) else []
            if isinstance(content, list):
                texts = [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
            parts += [str(message.get("role")), *texts]
            if message.get("role") == "user":
                break
    opening = "\n".join(parts).encode()[:OPENING_BYTES]
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    text = prompt.encode()[:PREFIX_BYTES] if isinstance(prompt, str) and not opening else opening
    return _hash(text) if text else None


class Model:
    """One model name and the replicas (engine processes) that serve it."""

    def __init__(self, name: str, replicas: Sequence[Backend]) -> None:
        self.name = name
        self.replicas = list(replicas)
        self._turn = itertools.count()
        self.recent_ttft_s: float | None = None  # a moving average over the last few dozen answers
        self.prefix_routing = False  # route by prompt prefix (see the module's docstring)
        self._ring: tuple[tuple[str, ...], list[tuple[int, Backend]]] = ((), [])

    def observe_ttft(self, ttft_s: float, weight: float = 0.1) -> None:
        previous = self.recent_ttft_s
        self.recent_ttft_s = ttft_s if previous is None else previous + weight * (ttft_s - previous)

    @property
    def context(self) -> int | None:
        return self.replicas[0].context

    @property
    def status(self) -> str:
        """ready when any replica can serve; else starting while any is coming up; else stopped."""
        statuses = {r.status for r in self.replicas}
        return next((s for s in ("ready", "starting") if s in statuses), "stopped")

    def pick(self, exclude: Iterable[Backend] = (), key: int | None = None) -> Backend | None:
        """The ready replica for a request whose prompt prefix is at `key` on the ring (with prefix routing),
        else the one with the fewest requests outstanding (ties taken in turn); None when none is ready."""
        skip = set(map(id, exclude))
        ready = [r for r in self.replicas if r.status == "ready" and id(r) not in skip]
        if not ready:
            return None
        if self.prefix_routing and key is not None and len(ready) > 1:
            return self._on_ring(key, ready)
        start = next(self._turn) % len(ready)
        rotated = ready[start:] + ready[:start]
        return min(rotated, key=lambda r: r.outstanding)

    def _on_ring(self, key: int, ready: list[Backend]) -> Backend:
        """The first ready replica clockwise from `key` within the load bound (one always is: the least busy)."""
        urls = tuple(r.url for r in self.replicas)
        if self._ring[0] != urls:
            points = sorted((_hash(f"{r.url}#{i}".encode()), i, r) for r in self.replicas for i in range(_POINTS))
            self._ring = (urls, [(point, r) for point, _, r in points])
        ring = self._ring[1]
        capacity = math.ceil(LOAD_BOUND * (sum(r.outstanding for r in ready) + 1) / len(ready))
        allowed = {id(r) for r in ready if r.outstanding < capacity}
        start = bisect.bisect_left(ring, key, key=lambda point: point[0])
        for i in range(len(ring)):
            backend = ring[(start + i) % len(ring)][1]
            if id(backend) in allowed:
                return backend
        return min(ready, key=lambda r: r.outstanding)  # pragma: no cover (the least busy is always allowed)


def unavailable(model: Model) -> GatewayError:
    """The 503 for a model none of whose replicas can take a request now."""
    if model.status == "starting":
        message = f"The engine for '{model.name}' is still starting; GET /ready says when it can serve."
    elif len(model.replicas) > 1:
        message = f"No replica of '{model.name}' can serve now; they are being restarted."
    else:
        message = f"The engine for '{model.name}' is not running; the gateway is restarting it."
    return GatewayError(503, message, "service_unavailable", "engine_unavailable")


class Router:
    """The models behind the gateway, by the name clients ask for."""

    def __init__(self, backends: Sequence[Backend], *, prefix_routing: bool = False) -> None:
        self.backends = list(backends)
        self.prefix_routing = prefix_routing
        self.models: dict[str, Model] = {}
        self.refresh()

    def refresh(self) -> None:
        """Route each name to the engines that serve it now (runtime adapters come and go); a name that stays
        keeps its Model, with its recent TTFT."""
        grouped: dict[str, list[Backend]] = {}
        for backend in self.backends:
            for name in (backend.model, *backend.adapters, *backend.runtime_adapters):
                grouped.setdefault(name, []).append(backend)
        models = {}
        for name, replicas in grouped.items():
            model = self.models.get(name) or Model(name, replicas)
            model.replicas = replicas
            model.prefix_routing = self.prefix_routing
            models[name] = model
        self.models = models

    @property
    def replicas(self) -> list[Backend]:
        """Every engine once (an engine serving LoRA adapters answers to several model names)."""
        return list(self.backends)

    def route(self, body: dict[str, object]) -> Model:
        name = body.get("model")
        names = ", ".join(sorted(self.models))
        if not isinstance(name, str) or not name:
            raise GatewayError(
                400,
                f"The request needs a 'model' field; this gateway serves: {names}.",
                "invalid_request_error",
                "missing_model",
                "model",
            )
        model = self.models.get(name)
        if model is None:
            raise GatewayError(
                404,
                f"The model '{name}' does not exist here; this gateway serves: {names}.",
                "invalid_request_error",
                "model_not_found",
                "model",
            )
        return model
