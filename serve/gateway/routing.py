"""Which engine answers a request: the model named in the body, then that model's least busy ready replica."""

from __future__ import annotations

import itertools
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


class Model:
    """One model name and the replicas (engine processes) that serve it."""

    def __init__(self, name: str, replicas: Sequence[Backend]) -> None:
        self.name = name
        self.replicas = list(replicas)
        self._turn = itertools.count()
        self.recent_ttft_s: float | None = None  # a moving average over the last few dozen answers

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

    def pick(self, exclude: Iterable[Backend] = ()) -> Backend | None:
        """The ready replica with the fewest requests outstanding (ties taken in turn), or None."""
        skip = set(map(id, exclude))
        ready = [r for r in self.replicas if r.status == "ready" and id(r) not in skip]
        if not ready:
            return None
        start = next(self._turn) % len(ready)
        rotated = ready[start:] + ready[:start]
        return min(rotated, key=lambda r: r.outstanding)


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

    def __init__(self, backends: Sequence[Backend]) -> None:
        self.backends = list(backends)
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
