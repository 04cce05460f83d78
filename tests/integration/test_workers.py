"""`deploykit serve --workers 3`, as the CLI starts it, on SQLite, in front of a fake engine process: the three
gateway processes share the port and the traffic, hold a key to one limit under concurrent load (no
over-admission), /metrics adds up all three whichever answers, a worker that dies is started again, and
the workers end with the first process: after a SIGTERM (drained) and after a kill -9 (their stdin closes)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from deploykit.core.ports import free_port
from tests.waiting import ready, until

REPO = Path(__file__).resolve().parents[2]


def _workers(gateway: subprocess.Popen[str]) -> list[psutil.Process]:
    return psutil.Process(gateway.pid).children()


def _serve(home: Path, engine: str, port: int, *more: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "deploykit", "serve", "--port", str(port), f"--engine=m1={engine}", *more]
    env = {**os.environ, "DEPLOYKIT_HOME": str(home)}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_three_workers_share_the_port_the_quotas_and_the_metrics(tmp_path: Path, engine: str) -> None:
    env = {**os.environ, "DEPLOYKIT_HOME": str(tmp_path)}

    def key(*args: str) -> str:
        made = subprocess.run([sys.executable, "-m", "deploykit", "keys", "create", *args, "--json"], env=env,
                              capture_output=True, text=True)  # fmt: skip
        assert made.returncode == 0, made.stderr
        return str(json.loads(made.stdout)["key"])

    per_minute, in_flight = key("--name", "rpm", "--rpm", "12"), key("--name", "conc", "--max-concurrent", "3")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gateway = _serve(tmp_path, engine, port, "--auth", "--workers", "3")
    try:
        until(lambda: ready(url), "never ready")
        workers = _workers(gateway)
        assert len(workers) == 2
        for process in (psutil.Process(gateway.pid), *workers):  # each one listens on the port, a socket its own
            until(lambda p=process: any(c.status == "LISTEN" and c.laddr.port == port for c in p.net_connections()),
                   f"{process.pid} does not listen")  # fmt: skip

        holders: list[int] = []  # per process, the client connections it holds after the burst

        async def burst() -> list[int]:
            body = {"model": "m1", "prompt": "x", "max_tokens": 1}
            async with httpx.AsyncClient(timeout=30, headers={"authorization": f"Bearer {per_minute}"}) as client:
                answers = await asyncio.gather(*(client.post(url + "/v1/completions", json=body) for _ in range(40)))
                for process in (psutil.Process(gateway.pid), *_workers(gateway)):  # kept alive, still open
                    held = [c for c in process.net_connections("tcp") if c.laddr.port == port]
                    holders.append(sum(c.status == "ESTABLISHED" for c in held))
            return [a.status_code for a in answers]

        assert sorted(asyncio.run(burst())) == [200] * 12 + [429] * 28
        assert sum(n > 0 for n in holders) >= 2, holders  # the kernel spread the connections

        async def streams() -> list[int]:
            body = {"model": "m1", "prompt": "x", "max_tokens": 40, "stream": True}  # 2 s each
            async with httpx.AsyncClient(timeout=30, headers={"authorization": f"Bearer {in_flight}"}) as client:

                async def one(i: int) -> int:
                    await asyncio.sleep(0.05 * i)  # all ten start within half a second, while the first hold on
                    async with client.stream("POST", url + "/v1/completions", json=body) as response:
                        await response.aread()
                        return response.status_code

                return list(await asyncio.gather(*(one(i) for i in range(10))))

        assert sorted(asyncio.run(streams())) == [200] * 3 + [429] * 7
        page = httpx.get(url + "/metrics").text  # loopback, no metrics token set: the operator
        counts = {line.split("} ")[0]: float(line.split("} ")[1]) for line in page.splitlines()
                  if line.startswith("deploykit_requests_total")}  # fmt: skip
        assert counts == {
            'deploykit_requests_total{key="rpm",model="m1",status="200"': 12,
            'deploykit_requests_total{key="rpm",model="m1",status="429"': 28,
            'deploykit_requests_total{key="conc",model="m1",status="200"': 3,
            'deploykit_requests_total{key="conc",model="m1",status="429"': 7,
        }  # every process's requests, whichever answered the scrape
        assert page.count("# TYPE deploykit_requests_total counter") == 1
        assert 'deploykit_replica_up{model="m1",replica="' + engine + '"} 1.0' in page

        dead = workers[0]
        dead.kill()
        until(lambda: len(_workers(gateway)) == 2 and dead.pid not in [w.pid for w in _workers(gateway)], "no restart")
        until(lambda: ready(url), "not ready after a worker's restart")
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(40) == 0
        assert "Gateway worker 1 exited" in (gateway.stdout.read() if gateway.stdout else "")
        until(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers[1:]), "left")
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()


def test_workers_end_when_the_first_process_is_killed(tmp_path: Path, engine: str) -> None:
    port = free_port()
    gateway = _serve(tmp_path, engine, port, "--workers", "2")
    try:
        until(lambda: ready(f"http://127.0.0.1:{port}"), "never ready")
        [worker] = _workers(gateway)
        gateway.kill()  # no signal handler runs: the worker learns it from its standard input's end
        gateway.wait()
        worker.wait(30)  # not its child: psutil waits until it is gone, but knows no exit status
        assert not worker.is_running()
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()


def test_a_hard_budget_holds_across_workers_under_concurrent_load(tmp_path: Path, engine: str) -> None:
    env = {**os.environ, "DEPLOYKIT_HOME": str(tmp_path)}

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "deploykit", *args], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    token = json.loads(cli("keys", "create", "--name", "alice", "--json"))["key"]
    body = json.dumps({"model": "m1", "prompt": "x", "max_tokens": 4}).encode()
    # $0.001 a prompt token, $0.002 a completion token; a request holds its body's bytes as prompt tokens and
    # its reservation (a token per 4 bytes, plus max_tokens) as completion tokens: room for five at once
    worst = (len(body) * 1000 + (-(-len(body) // 4) + 4) * 2000) / 1e6
    cap = 5 * worst + 1e-6
    cli("keys", "budget", "team", "--daily", str(cap), "--hard", "--keys", "alice")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gateway = _serve(tmp_path, engine, port, "--auth", "--workers", "2", "--token-price", "m1=1000/2000")
    try:
        until(lambda: ready(url), "never ready")

        async def burst() -> list[httpx.Response]:
            headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
            async with httpx.AsyncClient(timeout=30, headers=headers) as client:
                return list(await asyncio.gather(*(client.post(url + "/v1/completions", content=body)
                                                   for _ in range(40))))  # fmt: skip

        answers = asyncio.run(burst()) + asyncio.run(burst())
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(40)
    codes = [a.status_code for a in answers]
    refused = [a.json()["error"]["code"] for a in answers if a.status_code == 429]
    assert codes.count(200) >= 5 and refused and set(refused) == {"budget_exceeded"}
    usage = json.loads(cli("usage", "--by", "budget", "--json"))
    [team] = [r for r in usage["rows"] if r["group"] == "team"]
    assert team["requests"] == 80 and team["errors"] == len(refused)
    [daily] = usage["budgets"]
    assert daily["spent_usd"] == pytest.approx(team["cost_usd"])  # the budget's spend is the ledger's
    assert daily["spent_usd"] <= cap and daily["held_usd"] == 0  # never past the cap; every hold settled
    assert team["cost_usd"] == pytest.approx(codes.count(200) * (5 * 1000 + 4 * 2000) / 1e6)
