"""The serve runner's lifecycle with real processes and real HTTP, the fake engine standing in for vLLM:
engine death, failed start, port in use, client disconnects, Ctrl-C. (tests/e2e does it with vLLM.)"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from deploykit.core.ports import free_port

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Gateway:
    proc: subprocess.Popen[str]
    url: str
    engine_url: str
    home: Path

    def ledger(self) -> list[tuple[str, int, int]]:
        """(endpoint, status, completion tokens) of each ledger row, read as another process would."""
        db = sqlite3.connect(self.home / "deploykit.db")
        try:
            return db.execute("SELECT endpoint, status, completion_tokens FROM requests ORDER BY id").fetchall()
        finally:
            db.close()

    def engines(self) -> list[psutil.Process]:
        """The engine processes now running (a killed one lingers as a zombie until it is reaped)."""
        found = []
        for p in psutil.Process(self.proc.pid).children():
            with contextlib.suppress(psutil.ZombieProcess, psutil.NoSuchProcess):
                if "tests.fakes.engine" in p.cmdline():
                    found.append(p)
        return found

    def engine(self) -> psutil.Process:
        return self.engines()[0]

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out


def start(
    tmp_path: Path,
    *engine_args: str,
    port: int | None = None,
    replicas: int = 1,
    drain_s: float = 10,
    engine_port: int | None = None,
    **env: str,
) -> Gateway:
    port, engine_ports = port or free_port(), [engine_port or free_port() for _ in range(replicas)]
    engine_port = engine_ports[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.serve_fake", str(port), ",".join(map(str, engine_ports)), *engine_args],
        cwd=REPO,
        env={**os.environ, "DEPLOYKIT_HOME": str(tmp_path), "FAKE_DRAIN_S": str(drain_s), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return Gateway(proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{engine_port}", tmp_path)


def wait_ready(gw: Gateway, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client() as probe:
        while time.monotonic() < deadline:
            assert gw.proc.poll() is None, gw.finish()[1]
            try:
                if probe.get(gw.url + "/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise AssertionError("not ready")


def post_in_background(gw: Gateway, max_tokens: int) -> Callable[[], httpx.Response]:
    """POST a completion from a thread; the returned function waits for its response."""
    result: dict[str, httpx.Response] = {}
    body = {"model": "fake-model", "prompt": "x", "max_tokens": max_tokens}
    thread = threading.Thread(
        target=lambda: result.setdefault("r", httpx.post(gw.url + "/v1/completions", json=body, timeout=60))
    )
    thread.start()

    def wait() -> httpx.Response:
        thread.join(60)
        return result["r"]

    return wait


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    gw = start(tmp_path, "--token-delay", "0.05")
    wait_ready(gw)
    yield gw
    if gw.proc.poll() is None:
        gw.proc.send_signal(signal.SIGINT)
        gw.finish()


def test_a_dead_engine_answers_503_then_is_restarted(gateway: Gateway) -> None:
    answer = post_in_background(gateway, max_tokens=400)  # 20 s of generation
    time.sleep(0.5)
    dead = gateway.engine()
    dead.kill()
    response = answer()
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "engine_unavailable"
    deadline = time.monotonic() + 30
    while [e.pid for e in gateway.engines()] in ([], [dead.pid]):  # restarted after 0.2 s of backoff
        assert time.monotonic() < deadline
        time.sleep(0.05)
    wait_ready(gateway)
    body = {"model": "fake-model", "prompt": "x", "max_tokens": 3}
    assert httpx.post(gateway.url + "/v1/completions", json=body, timeout=30).status_code == 200
    gateway.proc.send_signal(signal.SIGINT)
    code, out = gateway.finish()
    assert code == 0, out
    assert "exited with status -9; restarting it in" in out
    assert "is back" in out


def test_an_engine_that_keeps_dying_is_given_up_and_serve_exits_6(tmp_path: Path) -> None:
    gw = start(tmp_path, "--die-after", "1.5")
    code, out = gw.finish(timeout=60)
    assert code == 6, out
    assert "died 3 times in a row; it was given up" in out
    assert "Starting vLLM server on" in out  # its last log lines are shown


def test_requests_go_around_a_dead_replica_while_it_restarts(tmp_path: Path) -> None:
    gw = start(tmp_path, "--token-delay", "0.01", replicas=2)
    try:
        wait_ready(gw)
        while set(httpx.get(gw.url + "/ready").json()["replicas"]["fake-model"].values()) != {"ready"}:
            time.sleep(0.05)  # /ready is 200 as soon as one replica can serve
        first, second = gw.engines()
        first.kill()  # the gateway has not noticed yet: the first request to it is retried on the other
        body = {"model": "fake-model", "prompt": "x", "max_tokens": 3}
        with httpx.Client(timeout=30) as client:
            statuses = [client.post(gw.url + "/v1/completions", json=body).status_code for _ in range(10)]
            assert statuses == [200] * 10
            assert client.get(gw.url + "/ready").status_code == 200  # one replica serving is enough
            deadline = time.monotonic() + 30
            while len({e.pid for e in gw.engines()} - {first.pid}) < 2:  # the dead one was restarted
                assert time.monotonic() < deadline
                time.sleep(0.05)
            while set(client.get(gw.url + "/ready").json()["replicas"]["fake-model"].values()) != {"ready"}:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert second.is_running()
    finally:
        gw.proc.send_signal(signal.SIGINT)
        code, out = gw.finish()
    assert code == 0, out
    assert "replica 1" in out and "restarting it in" in out


def test_engine_that_fails_to_start_shows_why(tmp_path: Path) -> None:
    code, out = start(tmp_path, "--no-such-flag").finish()
    assert code == 6
    assert "before it was ready" in out
    assert "unrecognized arguments: --no-such-flag" in out
    assert "Traceback" not in out.split("Error:")[-1]


def test_port_in_use_fails_before_the_engine_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        started = time.monotonic()
        code, out = start(tmp_path, port=taken.getsockname()[1]).finish()
    assert code == 4
    assert "already in use" in out and "--port" in out
    assert time.monotonic() - started < 10
    assert not (tmp_path / "logs").exists()  # no engine was started


def test_client_disconnect_mid_stream_aborts_at_the_engine(gateway: Gateway) -> None:
    body = {"model": "fake-model", "prompt": "x", "max_tokens": 400, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
    deadline = time.monotonic() + 5
    while (stats := httpx.get(gateway.engine_url + "/stats").json())["aborted"] < 1:
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)
    assert stats == {"finished": 0, "aborted": 1, "in_flight": 0}
    [(endpoint, status, tokens)] = gateway.ledger()
    assert (endpoint, status) == ("/v1/completions", 499) and 1 <= tokens < 400


def test_non_streaming_client_that_leaves_aborts_at_the_engine(gateway: Gateway) -> None:
    body = {"model": "fake-model", "prompt": "x", "max_tokens": 400}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway.url + "/v1/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 5
    while httpx.get(gateway.engine_url + "/stats").json()["in_flight"] > 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_ctrl_c_drains_stops_the_engine_and_exits_0(gateway: Gateway) -> None:
    tree = [psutil.Process(gateway.proc.pid), gateway.engine()]
    answer = post_in_background(gateway, max_tokens=20)  # 1 s of generation
    time.sleep(0.3)
    gateway.proc.send_signal(signal.SIGINT)
    response = answer()
    assert response.status_code == 200
    assert len(response.json()["choices"][0]["text"].split()) == 20
    code, out = gateway.finish()
    assert code == 0, out
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert not alive
    assert gateway.ledger() == [("/v1/completions", 200, 20)]


def test_every_answer_a_client_received_is_in_the_ledger_after_kill_9(tmp_path: Path) -> None:
    gw = start(tmp_path, "--token-delay", "0.001")
    wait_ready(gw)

    def ask(i: int) -> None:
        body = {"model": "fake-model", "prompt": "x", "max_tokens": 5 + i, "stream": i % 2 == 0}
        with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=30) as response:
            assert response.status_code == 200
            response.read()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gw.proc.kill()  # no drain, no flush: only what was committed before each answer's last byte survives
    gw.finish()
    assert sorted(tokens for _, _, tokens in gw.ledger()) == [5 + i for i in range(16)]


def test_at_the_drain_deadline_streams_end_with_an_error_a_ledger_row_and_an_engine_abort(tmp_path: Path) -> None:
    gw = start(tmp_path, "--token-delay", "0.05", drain_s=2)  # 200 tokens: 10 s each, the drain allows 2
    wait_ready(gw)
    bodies: list[str] = [""] * 3
    ended: list[float] = [0.0] * 3

    def stream(i: int) -> None:
        body = {"model": "fake-model", "prompt": "x", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=30) as response:
            for text in response.iter_text():
                bodies[i] += text
        ended[i] = time.monotonic()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    signalled = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    code, out = gw.finish()
    assert code == 0, out
    for body, end in zip(bodies, ended, strict=True):
        assert '"code": "shutting_down"' in body and "[DONE]" not in body, body[-300:]
        assert end - signalled < 2 + 1.5, "the stream was not cut at the deadline"
    rows = gw.ledger()
    assert [(endpoint, status) for endpoint, status, _ in rows] == [("/v1/completions", 503)] * 3
    for (_, _, tokens), body in zip(sorted(rows), sorted(bodies, key=lambda b: b.count('"text"')), strict=True):
        assert tokens == body.count('"text"') and 20 <= tokens < 200  # what was relayed, counted
    engine_log = (tmp_path / "logs" / "engine-fake-model.log").read_text()
    assert engine_log.count("fake engine: aborted a stream") == 3  # aborted at the engine, not left running


def test_an_engine_port_another_server_holds_fails_fast_instead_of_looking_ready(tmp_path: Path) -> None:
    """The other server answers /health: readiness must come from the engine that was started."""
    from tests.fakes.engine import create_fake_engine
    from tests.fakes.threaded import serve_in_thread

    with serve_in_thread(create_fake_engine("fake-model")) as squatter:
        port = int(squatter.rsplit(":", 1)[1])
        code, out = start(tmp_path, engine_port=port).finish()
    assert code == 4, out
    assert f"Port {port} on 127.0.0.1 is already in use" in out and "engine port for fake-model" in out
    assert "Ready" not in out


def test_readiness_comes_only_from_the_engine_process_that_was_started(tmp_path: Path) -> None:
    from deploykit.serve.engine import EngineProcess
    from deploykit.serve.plan import LaunchPlan
    from tests.fakes.engine import create_fake_engine
    from tests.fakes.threaded import serve_in_thread

    def plan(argv: tuple[str, ...], port: int) -> LaunchPlan:
        return LaunchPlan("cpu", argv, {}, (), "fake-model", port, 2048, 0)

    with serve_in_thread(create_fake_engine("fake-model")) as squatter:
        taken = int(squatter.rsplit(":", 1)[1])
        impostor = EngineProcess(plan((sys.executable, "-c", "import time; time.sleep(30)"), taken), tmp_path / "a.log")
        impostor.start()
        try:
            assert httpx.get(squatter + "/health").status_code == 200  # the port answers...
            assert not impostor.listens()  # ...but not from the process we started
        finally:
            impostor.stop()
    port = free_port()
    engine = EngineProcess(
        plan((sys.executable, "-m", "tests.fakes.engine", "--port", str(port)), port), tmp_path / "b.log"
    )
    engine.start()
    try:
        deadline = time.monotonic() + 30
        while not engine.listens():
            assert time.monotonic() < deadline, engine.last_lines()
            time.sleep(0.1)
    finally:
        engine.stop()
    assert not engine.listens()


def test_a_streamed_answer_is_in_the_ledger_before_its_done_even_on_a_slow_disk(tmp_path: Path) -> None:
    """Each ledger commit is held back 0.5 s: [DONE] must wait for it, so a kill -9 the instant the client has
    [DONE] still finds the row (sent first and committed after, the row would be lost)."""
    gw = start(tmp_path, "--token-delay", "0.001", FAKE_LEDGER_DELAY="0.5")
    wait_ready(gw)
    for tokens in (3, 4):
        body = {"model": "fake-model", "prompt": "x", "max_tokens": tokens, "stream": True}
        with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=30) as response:
            text = "".join(response.iter_text())
        assert text.rstrip().endswith("data: [DONE]")
    gw.proc.kill()
    gw.finish()
    assert gw.ledger() == [("/v1/completions", 200, 3), ("/v1/completions", 200, 4)]


def test_beyond_loopback_keys_are_required_by_default(tmp_path: Path) -> None:
    gw = start(tmp_path, FAKE_HOST="0.0.0.0")
    try:
        wait_ready(gw)
        body = {"model": "fake-model", "prompt": "x", "max_tokens": 2}
        response = httpx.post(gw.url + "/v1/completions", json=body, timeout=30)
        assert response.status_code == 401 and response.json()["error"]["code"] == "missing_api_key"
    finally:
        gw.proc.send_signal(signal.SIGINT)
        code, out = gw.finish()
    assert code == 0 and "API keys are required but none exist" in out


def test_an_engine_that_dies_mid_stream_ends_the_stream_with_an_error_and_a_502_row(gateway: Gateway) -> None:
    body = {"model": "fake-model", "prompt": "x", "max_tokens": 400, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]  # 3 events and their blank lines
        gateway.engine().kill()
        received += list(lines)
    events = [line.removeprefix("data: ") for line in received if line.startswith("data: ")]
    assert json.loads(events[-1])["error"]["code"] == "engine_unavailable" and "[DONE]" not in events
    deadline = time.monotonic() + 5
    while not gateway.ledger():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [(endpoint, status, tokens)] = gateway.ledger()
    assert (endpoint, status) == ("/v1/completions", 502) and tokens == len(events) - 1
