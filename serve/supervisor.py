"""Keeps every engine replica running: notices when it is ready, restarts it with backoff when it dies,
and gives a replica up when it keeps dying. The gateway routes only to ready replicas meanwhile.

A replica that fails its very first start is not retried: that is a configuration problem (a bad flag,
weights that do not load), and `serve` stops with the engine's own log lines. After a first success,
deaths are restarted after 1, 2, 4, ... seconds (up to max_backoff_s); a replica that dies more than
max_failures times without staying up stable_s in between is given up; when every replica of a model
is given up, `serve` stops.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx

from deploykit.serve.engine import EngineProcess, EngineProgress, Startup
from deploykit.serve.gateway.routing import Backend
from deploykit.serve.plan import LaunchPlan


@dataclass(frozen=True)
class RestartPolicy:
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    max_failures: int = 5
    stable_s: float = 60.0

    def delay_s(self, failures: int) -> float:
        return float(min(self.max_backoff_s, self.backoff_s * 2 ** (failures - 1)))


@dataclass(frozen=True)
class Ready:
    """One replica became ready for the first time."""

    model: str
    replica: int
    startup: Startup
    engine_url: str
    predicted_kv_tokens: int
    logged_kv_tokens: int | None


class Events(Protocol):
    def progress(self, name: str, progress: EngineProgress) -> None: ...
    def ready(self, ready: Ready) -> None: ...
    def warn(self, message: str) -> None: ...


@dataclass(frozen=True)
class Failure:
    """Why serving must stop: a first start that failed or timed out, or a model with no replica left."""

    kind: str  # failed | timeout | died
    engine: EngineProcess
    failures: int = 0


class Replica:
    def __init__(self, plan: LaunchPlan, index: int, log_path: Path, backend: Backend, *, several: bool) -> None:
        self.plan = plan
        self.index = index
        self.several = several  # the model has other replicas: name this one by its number
        self.log_path = log_path
        self.backend = backend
        self.engine = EngineProcess(plan, log_path)
        self.started_at = 0.0
        self.ever_ready = False
        self.ready_since: float | None = None
        self.failures = 0
        self.restart_at: float | None = None
        self.given_up = False

    @property
    def label(self) -> str:
        return f"{self.plan.served_name} (replica {self.index + 1})" if self.several else self.plan.served_name

    def start(self, now: float) -> None:
        self.engine = EngineProcess(self.plan, self.log_path)  # a fresh process each time, same plan and port
        self.engine.start()
        self.started_at = now
        self.restart_at = None
        self.backend.status = "starting"


class Supervisor:
    def __init__(
        self,
        replicas: Sequence[Replica],
        events: Events,
        *,
        policy: RestartPolicy,
        start_timeout_s: float,
    ) -> None:
        self.replicas = list(replicas)
        self.events = events
        self.policy = policy
        self.start_timeout_s = start_timeout_s

    def start_all(self) -> None:
        now = time.monotonic()
        for replica in self.replicas:
            replica.start(now)

    def stop_all(self) -> None:
        for replica in self.replicas:
            replica.backend.status = "stopped"
            replica.engine.stop()

    async def step(self, probe: httpx.AsyncClient) -> Failure | None:
        """Look at every replica once; a Failure when serving cannot go on."""
        now = time.monotonic()
        for r in self.replicas:
            code = r.engine.returncode()
            if r.backend.status == "ready" and code is not None:
                self._died(r, now, f"exited with status {code}")
            elif r.backend.status == "starting":
                if code is not None:
                    if not r.ever_ready:
                        return Failure("failed", r.engine)
                    self._died(r, now, f"exited with status {code} while restarting")
                elif await healthy(probe, r.engine.url) and r.engine.listens():
                    self._ready(r, now)  # healthy, and the port is its own (not a server that took it)
                elif now - r.started_at > self.start_timeout_s:
                    if not r.ever_ready:
                        return Failure("timeout", r.engine)
                    r.engine.stop()
                    self._died(r, now, f"was not ready {self.start_timeout_s:.0f} s after a restart")
                elif not r.ever_ready:
                    self.events.progress(r.label, r.engine.progress())
            elif r.restart_at is not None and now >= r.restart_at:
                self.events.warn(f"Restarting the engine for {r.label}.")
                r.start(now)
        for name in {r.plan.served_name for r in self.replicas}:
            mine = [r for r in self.replicas if r.plan.served_name == name]
            if all(r.given_up for r in mine):
                return Failure("died", mine[-1].engine, mine[-1].failures)
        return None

    def _ready(self, r: Replica, now: float) -> None:
        startup = r.engine.startup(now - r.started_at)
        r.backend.status = "ready"
        r.backend.startup = startup.as_dict()
        r.ready_since = now
        if r.ever_ready:
            self.events.warn(f"The engine for {r.label} is back after {startup.seconds:.0f} s ({startup.describe()}).")
            return
        r.ever_ready = True
        self.events.ready(
            Ready(
                model=r.plan.served_name,
                replica=r.index,
                startup=startup,
                engine_url=r.engine.url,
                predicted_kv_tokens=r.plan.kv_cache_tokens,
                logged_kv_tokens=r.engine.logged_kv_cache_tokens,
            )
        )

    def _died(self, r: Replica, now: float, why: str) -> None:
        r.backend.status = "stopped"
        r.engine.stop()  # whatever it left behind
        if r.ready_since is not None and now - r.ready_since >= self.policy.stable_s:
            r.failures = 0
        r.ready_since = None
        r.failures += 1
        last = "; ".join(r.engine.last_lines(3))
        if r.failures > self.policy.max_failures:
            r.given_up = True
            self.events.warn(f"The engine for {r.label} {why}, {r.failures} times in a row: giving it up. {last}")
            return
        delay = self.policy.delay_s(r.failures)
        r.restart_at = now + delay
        self.events.warn(
            f"The engine for {r.label} {why}; restarting it in {delay:g} s (log: {r.log_path}). {last}".strip()
        )


async def healthy(probe: httpx.AsyncClient, url: str) -> bool:
    """Whether the engine at `url` answers its /health with 200."""
    try:
        return (await probe.get(url + "/health")).status_code == 200
    except httpx.TransportError:
        return False
