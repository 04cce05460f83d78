"""Engines that run elsewhere (a container, a pod, another server): `deploykit serve --engine NAME=URL` puts
the gateway in front of them instead of starting engines of its own.

Each is watched through its /health, as the supervisor watches a local engine: ready while it answers 200,
stopped while it does not (the gateway routes around it and /ready says so). Nothing here starts or
restarts them; their orchestrator (compose, Kubernetes) does. A gateway without engines to start holds no
GPU, so several of them can share one deployment's PostgreSQL behind a load balancer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from deploykit.core.errors import UsageError
from deploykit.serve.gateway.routing import Backend
from deploykit.serve.supervisor import Events, Failure, healthy


@dataclass(frozen=True)
class RemoteEngine:
    model: str  # the name clients ask for, as the engine serves it (its --served-model-name)
    url: str  # its base URL, e.g. http://engine-0:8000


def parse_engine(spec: str) -> RemoteEngine:
    """NAME=URL, as --engine takes it."""
    name, sep, url = spec.partition("=")
    if not sep or not name.strip() or not url.startswith(("http://", "https://")):
        raise UsageError(
            f"--engine '{spec}' is not NAME=URL.", "For example --engine llama=http://engine-0:8000 (once per replica)."
        )
    return RemoteEngine(name.strip(), url.rstrip("/"))


class RemoteWatch:
    """The supervisor's part for engines deploykit does not run: follow each one's health."""

    def __init__(self, backends: Sequence[Backend], events: Events) -> None:
        self.backends = list(backends)
        self.events = events

    def start_all(self) -> None:
        """Nothing to start: the engines are the orchestrator's."""

    def stop_all(self) -> None:
        for backend in self.backends:
            backend.status = "stopped"

    async def step(self, probe: httpx.AsyncClient) -> Failure | None:
        """Look at every engine once. A remote engine never ends the gateway: its orchestrator restarts it."""
        for backend in self.backends:
            up = await healthy(probe, backend.url)
            if up and backend.status != "ready":
                backend.context = await _max_model_len(probe, backend)
                backend.status = "ready"
                self.events.warn(f"The engine for {backend.model} at {backend.url} is ready.")
            elif not up and backend.status == "ready":
                backend.status = "stopped"
                self.events.warn(
                    f"The engine for {backend.model} at {backend.url} fails its health check; requests go to its "
                    "other replicas (or get 503) until it is back."
                )
        return None


async def _max_model_len(probe: httpx.AsyncClient, backend: Backend) -> int | None:
    """The engine's context length as its /v1/models says (vLLM's `max_model_len`), for the token budget."""
    try:
        listing = (await probe.get(backend.url + "/v1/models")).json()
    except (httpx.TransportError, ValueError):
        return None
    for entry in listing.get("data", []) if isinstance(listing, dict) else []:
        if isinstance(entry, dict) and entry.get("id") == backend.model and isinstance(entry.get("max_model_len"), int):
            return int(entry["max_model_len"])
    return None
