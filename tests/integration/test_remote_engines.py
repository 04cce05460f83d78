"""`deploykit serve --engine NAME=URL`: the gateway alone, as the CLI starts it, in front of two engine
processes it did not start (fake engines, as compose or Kubernetes would run vLLM): both get traffic, one
that dies is routed around and rejoins when it is back, and a signal stops the gateway with exit 0 while
the engines run on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deploykit.core.ports import free_port
from tests.waiting import until

REPO = Path(__file__).resolve().parents[2]


def _engine(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.engine", "--port", str(port), "--model", "m1", "--token-delay", "0.001"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=2)
    except httpx.TransportError:
        return None


@pytest.fixture
def engines() -> Iterator[list[subprocess.Popen[bytes]]]:
    ports = [free_port(), free_port()]
    procs = [_engine(p) for p in ports]
    procs[0].args_port, procs[1].args_port = ports  # type: ignore[attr-defined]
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def test_the_gateway_alone_fronts_engines_it_did_not_start(
    tmp_path: Path, engines: list[subprocess.Popen[bytes]]
) -> None:
    urls = [f"http://127.0.0.1:{e.args_port}" for e in engines]  # type: ignore[attr-defined]
    port = free_port()
    gateway = subprocess.Popen(
        [sys.executable, "-m", "deploykit", "serve", "--port", str(port), *(f"--engine=m1={u}" for u in urls)],
        cwd=REPO,
        env={**os.environ, "DEPLOYKIT_HOME": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        until(lambda: (r := _get(url + "/ready")) is not None and r.status_code == 200, "never ready")
        ask = {"model": "m1", "prompt": "x", "max_tokens": 3}
        for _ in range(8):
            assert httpx.post(url + "/v1/completions", json=ask, timeout=10).status_code == 200
        served = [httpx.get(u + "/stats").json()["finished"] for u in urls]
        assert all(n > 0 for n in served) and sum(served) == 8  # both engines got traffic
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "m1"

        engines[0].kill()
        engines[0].wait()
        for _ in range(4):  # the dead replica is routed around, before and after its health check fails
            assert httpx.post(url + "/v1/completions", json=ask, timeout=10).status_code == 200

        def replicas() -> dict[str, str]:
            status: dict[str, str] = httpx.get(url + "/ready").json()["replicas"]["m1"]
            return status

        until(lambda: replicas() == {urls[0]: "stopped", urls[1]: "ready"}, "the dead engine is still ready")
        assert httpx.get(url + "/ready").status_code == 200  # the model still has a ready replica
        engines[0] = _engine(int(urls[0].rsplit(":", 1)[1]))
        until(lambda: replicas() == {urls[0]: "ready", urls[1]: "ready"}, "the engine did not rejoin")
    finally:
        gateway.send_signal(signal.SIGTERM)
        out, _ = gateway.communicate(timeout=30)
    assert gateway.returncode == 0, out
    assert f"The engine for m1 at {urls[0]} fails its health check" in out
    assert all(e.poll() is None for e in engines)  # the engines are not the gateway's to stop


def test_engine_specs_that_are_not_name_equals_url_are_refused(tmp_path: Path) -> None:
    env = {**os.environ, "DEPLOYKIT_HOME": str(tmp_path)}
    for args, message in (
        (["--engine", "m1"], "--engine 'm1' is not NAME=URL"),
        (["--engine", "m1=engine-0:8000"], "is not NAME=URL"),
        (["smollm2-135m", "--engine", "m1=http://h:1"], "--engine fronts engines that run elsewhere"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "deploykit", "serve", *args], cwd=REPO, env=env, capture_output=True, text=True
        )
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
