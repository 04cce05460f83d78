"""The supervisor and the serve runner in this process (real fake-engine processes, real HTTP), so that their
logic is exercised where a test can see it: start, readiness, restarts with back-off, giving up, a first
start that fails or times out, and `run` from start to a signal. (test_lifecycle.py runs the same paths
as a user does, in a process of their own.)"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx
import pytest

from deploykit.core.errors import EngineDiedError, EngineStartError, PortInUseError, UsageError
from deploykit.core.ports import free_port
from deploykit.core.settings import Settings
from deploykit.serve.engine import EngineProgress
from deploykit.serve.gateway.routing import Backend
from deploykit.serve.plan import LaunchPlan
from deploykit.serve.runner import ServeOptions, ServeReporter, run
from deploykit.serve.supervisor import Failure, Ready, Replica, RestartPolicy, Supervisor

FAST = RestartPolicy(backoff_s=0.2, max_backoff_s=0.4, max_failures=2, stable_s=30)


def fake_plan(port: int, *args: str, name: str = "fake-model") -> LaunchPlan:
    argv = (sys.executable, "-m", "tests.fakes.engine", "--port", str(port), "--model", name, *args)
    return LaunchPlan("cpu", argv, {}, (), name, port, 2048, 0)


class Recorder(ServeReporter):
    """Everything the supervisor and the runner report, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def starting(self, url: str, engines: object) -> None:
        self.events.append(("starting", url))

    def warn(self, message: str) -> None:
        self.events.append(("warn", message))

    def progress(self, name: str, progress: EngineProgress) -> None:
        self.events.append(("progress", progress.phase))

    def ready(self, ready: Ready) -> None:
        self.events.append(("ready", ready))

    def stopping(self, reason: str) -> None:
        self.events.append(("stopping", reason))

    def warnings(self) -> list[str]:
        return [str(m) for kind, m in self.events if kind == "warn"]


def supervise(tmp_path: Path, plans: list[LaunchPlan], policy: RestartPolicy = FAST, start_timeout_s: float = 30):
    """A supervisor over `plans` and a coroutine that steps it until `until(supervisor)` or a failure."""
    recorder = Recorder()

    async def make() -> tuple[Supervisor, list[Replica]]:
        session = aiohttp.ClientSession()
        replicas = [
            Replica(p, i, tmp_path / f"engine-{i}.log", Backend(p.served_name, p.url, session), several=len(plans) > 1)
            for i, p in enumerate(plans)
        ]
        return Supervisor(replicas, recorder, policy=policy, start_timeout_s=start_timeout_s), replicas

    return recorder, make


async def step_until(supervisor: Supervisor, done: object, timeout_s: float = 30) -> Failure | None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2.0) as probe:
        while time.monotonic() < deadline:
            failure = await supervisor.step(probe)
            if failure is not None or done():  # type: ignore[operator]
                return failure
            await asyncio.sleep(0.05)
    raise AssertionError("timed out")


def test_a_replica_becomes_ready_dies_is_restarted_with_backoff_and_is_given_up(tmp_path: Path) -> None:
    recorder, make = supervise(tmp_path, [fake_plan(free_port(), "--startup-delay", "0.3")])

    async def scenario() -> None:
        supervisor, [replica] = await make()
        supervisor.start_all()
        try:
            assert replica.backend.status == "starting"
            assert await step_until(supervisor, lambda: replica.backend.status == "ready") is None
            [ready] = [e for kind, e in recorder.events if kind == "ready"]
            assert isinstance(ready, Ready) and ready.model == "fake-model" and ready.replica == 0
            assert 0.3 <= ready.startup_s < 20 and ready.engine_url == replica.plan.url
            assert ("progress", "starting the process") in recorder.events or any(
                kind == "progress" for kind, _ in recorder.events
            )
            for death in (1, 2, 3):
                first_pid = replica.engine.pid
                replica.engine.stop()  # the engine dies (exit by signal)
                died_at = time.monotonic()
                failure = await step_until(supervisor, lambda: replica.backend.status == "stopped")
                assert failure is None or death == 3
                if death == 3:  # max_failures 2: the third death in a row gives it up
                    assert failure is not None and failure.kind == "died" and failure.failures == 3
                    assert replica.given_up and "3 times in a row: giving it up" in recorder.warnings()[-1]
                    return
                assert replica.failures == death
                assert f"restarting it in {FAST.delay_s(death):g} s" in recorder.warnings()[-1]
                await step_until(supervisor, lambda: replica.backend.status == "ready")
                assert replica.engine.pid != first_pid
                assert time.monotonic() - died_at >= FAST.delay_s(death)  # waited out the back-off
                assert "is back" in recorder.warnings()[-1]
        finally:
            supervisor.stop_all()
            await replica.backend.session.close()

    asyncio.run(scenario())


def test_a_first_start_that_fails_or_times_out_is_not_retried(tmp_path: Path) -> None:
    _, make = supervise(tmp_path, [fake_plan(free_port(), "--no-such-flag")])

    async def failing() -> None:
        supervisor, [replica] = await make()
        supervisor.start_all()
        try:
            failure = await step_until(supervisor, lambda: False)
            assert failure is not None and failure.kind == "failed" and failure.engine is replica.engine
            assert any("unrecognized arguments" in line for line in replica.engine.last_lines())
        finally:
            supervisor.stop_all()
            await replica.backend.session.close()

    asyncio.run(failing())
    _, make = supervise(tmp_path, [fake_plan(free_port(), "--startup-delay", "30")], start_timeout_s=0.5)

    async def slow() -> None:
        supervisor, [replica] = await make()
        supervisor.start_all()
        try:
            failure = await step_until(supervisor, lambda: False)
            assert failure is not None and failure.kind == "timeout"
            assert replica.backend.status == "starting" and not replica.ever_ready
        finally:
            supervisor.stop_all()
            await replica.backend.session.close()
        assert replica.backend.status == "stopped" and replica.engine.returncode() is not None

    asyncio.run(slow())


def test_one_replica_dying_leaves_the_model_served_and_names_the_replica(tmp_path: Path) -> None:
    recorder, make = supervise(tmp_path, [fake_plan(free_port()), fake_plan(free_port())])

    async def scenario() -> None:
        supervisor, replicas = await make()
        supervisor.start_all()
        try:
            await step_until(supervisor, lambda: all(r.backend.status == "ready" for r in replicas))
            assert [r.label for r in replicas] == ["fake-model (replica 1)", "fake-model (replica 2)"]
            replicas[1].engine.stop()
            assert await step_until(supervisor, lambda: replicas[1].backend.status == "stopped") is None
            assert replicas[0].backend.status == "ready"
            assert "fake-model (replica 2)" in recorder.warnings()[-1]
        finally:
            supervisor.stop_all()
            await replicas[0].backend.session.close()
        assert all(r.backend.status == "stopped" and r.engine.returncode() is not None for r in replicas)

    asyncio.run(scenario())


# run(): the whole of `deploykit serve` in this process


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    monkeypatch.setenv("DEPLOYKIT_HOME", str(tmp_path))
    yield Settings()


def interrupt_after(work: object) -> threading.Thread:
    """Run `work` in a thread, then send this process SIGTERM, as a service manager would. (Not SIGINT: if a
    bug left no handler, SIGTERM ends the test process, where SIGINT would read as a user stopping pytest.)"""

    def go() -> None:
        try:
            work()  # type: ignore[operator]
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def wait_ready(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("not ready")


def test_run_serves_until_a_signal_then_stops_everything(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    plans = [fake_plan(free_port(), "--token-delay", "0.01"), fake_plan(free_port(), name="other")]
    recorder = Recorder()
    answers: list[int] = []

    def client() -> None:
        wait_ready(url)
        for model in ("fake-model", "other"):
            body = {"model": model, "prompt": "x", "max_tokens": 3}
            answers.append(httpx.post(url + "/v1/completions", json=body, timeout=30).status_code)

    before = signal.getsignal(signal.SIGTERM)
    thread = interrupt_after(client)
    run(settings, plans, ServeOptions(port=port, drain_timeout_s=5), recorder, FAST)
    thread.join(10)
    assert answers == [200, 200]
    kinds = [kind for kind, _ in recorder.events]
    assert kinds[0] == "starting" and kinds.count("ready") == 2
    assert ("stopping", "draining in-flight requests") in recorder.events
    assert recorder.events[-1] == ("stopping", "stopping the engines")
    db = sqlite3.connect(tmp_path / "deploykit.db")
    rows = db.execute("SELECT model, status, completion_tokens FROM requests ORDER BY id").fetchall()
    deployments = db.execute("SELECT models, device, stopped_at IS NOT NULL FROM deployments").fetchall()
    db.close()
    assert rows == [("fake-model", 200, 3), ("other", 200, 3)]
    assert deployments == [("fake-model,other", "cpu", 1)]
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are the test process's again


def test_run_raises_what_the_cli_prints(settings: Settings) -> None:
    with pytest.raises(EngineStartError, match=r"exited .* before it was ready") as e:
        run(settings, [fake_plan(free_port(), "--no-such-flag")], ServeOptions(port=free_port()), Recorder(), FAST)
    assert any("unrecognized arguments" in line for line in e.value.details)
    with pytest.raises(EngineDiedError, match="died 3 times in a row"):
        plan = fake_plan(free_port(), "--die-after", "1")
        run(settings, [plan], ServeOptions(port=free_port()), Recorder(), FAST)
    with pytest.raises(EngineStartError, match="not ready after 1 s"):
        plan = fake_plan(free_port(), "--startup-delay", "30")
        run(settings, [plan], ServeOptions(port=free_port(), start_timeout_s=1), Recorder(), FAST)
    with pytest.raises(UsageError, match="--spill names 'nope'"):
        from deploykit.models.prices import load_prices
        from deploykit.serve.gateway.spill import parse_spill

        spill = parse_spill("nope=gpt-4o-mini@https://x", load_prices(), "k")
        run(settings, [fake_plan(free_port())], ServeOptions(port=free_port(), spills=(spill,)), Recorder(), FAST)
    with pytest.raises(PortInUseError):
        import socket

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            run(settings, [fake_plan(free_port())], ServeOptions(port=taken.getsockname()[1]), Recorder(), FAST)
