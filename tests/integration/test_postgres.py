"""Keys and the ledger on a real PostgreSQL server (tests/integration/conftest.py starts one, or takes
DEPLOYKIT_DATABASE_URL), the shared database several gateways use."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from deploykit.core.ports import free_port
from deploykit.serve.accounting.budgets import BudgetKeeper, set_budget
from deploykit.serve.accounting.database import MIGRATIONS, connect, migrate
from deploykit.serve.accounting.keys import create_key, list_keys, revoke_key
from deploykit.serve.accounting.ledger import DeploymentLog, Ledger, UsageRecord, deployment_hours, usage_by
from deploykit.serve.gateway import Backend, create_app
from deploykit.serve.gateway.app import GatewayOptions
from deploykit.serve.gateway.proxy import engine_session
from tests.fakes.engine import PROMPT_TOKENS
from tests.integration.test_lifecycle import REPO, start, wait_ready
from tests.unit.test_budgets import race_for_holds
from tests.waiting import ready, until


def test_migrations_apply_once_in_order(postgres_url: str) -> None:
    db = connect(postgres_url)
    assert migrate(db) == []  # connect applied them all already
    names = [name for (name,) in db.query("SELECT name FROM migrations ORDER BY name")]
    assert names == [name for name, _ in MIGRATIONS]
    db.close()


def test_keys_ledger_and_deployments_on_postgres(postgres_url: str, engine_url: str) -> None:
    db = connect(postgres_url)
    _, token = create_key(db, "pg-team", models=["m1"], rpm=100)
    assert [k.name for k in list_keys(db)] == ["pg-team"]
    deployment = DeploymentLog(db, ["m1"], "gpu", 4)

    async def traffic() -> list[int]:
        async with engine_session() as session:
            app = create_app([Backend("m1", engine_url, session, status="ready")], db, GatewayOptions(auth=True))
            headers = {"authorization": f"Bearer {token}"}
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://g", headers=headers) as client:
                body = {"model": "m1", "prompt": "x", "max_tokens": 4, "stream": True}
                responses = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(10)))
            app.state.gateway.close()
        return [r.status_code for r in responses]

    assert asyncio.run(traffic()) == [200] * 10
    deployment.stop()
    [row] = usage_by(db, "key")
    assert (row.group, row.requests, row.prompt_tokens, row.completion_tokens) == (
        "pg-team",
        10,
        10 * PROMPT_TOKENS,
        40,
    )
    assert set(deployment_hours(db)) == {"gpu"}
    assert revoke_key(db, "pg-team").revoked_at is not None
    db.close()


def test_two_gateways_share_keys_and_one_ledger(postgres_url: str, tmp_path: Path) -> None:
    """Two `serve` processes (keys required: they listen beyond loopback), one PostgreSQL: a key made once
    works on both, both write one ledger, `deploykit usage` sums them, and a revocation reaches both."""
    env = {**os.environ, "DEPLOYKIT_DATABASE_URL": postgres_url, "DEPLOYKIT_HOME": str(tmp_path / "cli")}

    def cli(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "deploykit", *args], env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result.stdout

    token = json.loads(cli("keys", "create", "--name", "shared", "--json"))["key"]
    gateways = [start(tmp_path / f"gw{i}", FAKE_HOST="0.0.0.0", DEPLOYKIT_DATABASE_URL=postgres_url) for i in range(2)]
    try:
        for gw in gateways:
            wait_ready(gw)
        headers = {"authorization": f"Bearer {token}"}
        body = {"model": "fake-model", "prompt": "x", "max_tokens": 3}
        for gw in gateways:
            for _ in range(5):
                assert httpx.post(gw.url + "/v1/completions", json=body, headers=headers, timeout=30).status_code == 200
        cli("keys", "revoke", "shared")
        time.sleep(5.5)  # gateways cache a key for 5 s
        for gw in gateways:
            assert httpx.post(gw.url + "/v1/completions", json=body, headers=headers, timeout=30).status_code == 401
    finally:
        for gw in gateways:
            gw.proc.send_signal(signal.SIGINT)
            gw.finish()
    rows = {r["group"]: r for r in json.loads(cli("usage", "--by", "key", "--json"))["rows"]}
    assert (rows["shared"]["requests"], rows["shared"]["errors"], rows["shared"]["completion_tokens"]) == (10, 0, 30)
    assert (rows["(no key)"]["requests"], rows["(no key)"]["errors"]) == (2, 2)  # the revoked key, refused
    db = connect(postgres_url)
    served = "SELECT DISTINCT replica FROM requests WHERE status = 200 AND model = 'fake-model'"
    replicas = {r for (r,) in db.query(served)}
    deployments = db.query("SELECT COUNT(*) FROM deployments WHERE stopped_at IS NOT NULL")
    db.close()
    assert replicas == {gw.engine_url for gw in gateways} and deployments[0][0] >= 2


def test_two_gateways_hold_one_key_to_one_limit_under_concurrent_load(postgres_url: str, tmp_path: Path) -> None:
    """Two gateway processes (`serve --engine`, in front of one engine process) on one PostgreSQL: a key with
    12 requests a minute gets exactly 12 answers from 40 sent at once to both; a key with 3 in flight gets
    exactly 3 streams out of 10 held open across both, the others a 429 that says so."""
    env = {**os.environ, "DEPLOYKIT_DATABASE_URL": postgres_url, "DEPLOYKIT_HOME": str(tmp_path / "cli")}

    def cli(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "deploykit", *args], env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result.stdout

    tag = uuid.uuid4().hex[:8]
    per_minute = json.loads(cli("keys", "create", "--name", f"rpm-{tag}", "--rpm", "12", "--json"))["key"]
    in_flight = json.loads(cli("keys", "create", "--name", f"conc-{tag}", "--max-concurrent", "3", "--json"))["key"]
    engine_port, ports = free_port(), [free_port(), free_port()]
    quiet = {"cwd": REPO, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    fake = [sys.executable, "-m", "tests.fakes.engine", "--model", "m1", "--token-delay", "0.05"]
    engine = subprocess.Popen([*fake, "--port", str(engine_port)], **quiet)  # type: ignore[call-overload]
    serve = [sys.executable, "-m", "deploykit", "serve", "--auth", f"--engine=m1=http://127.0.0.1:{engine_port}"]
    gateways = [subprocess.Popen([*serve, "--port", str(p)], env=env, **quiet) for p in ports]  # type: ignore[call-overload]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        for url in urls:
            until(lambda url=url: ready(url), f"{url} not ready", timeout_s=60)

        async def burst() -> list[int]:
            body = {"model": "m1", "prompt": "x", "max_tokens": 1}
            async with httpx.AsyncClient(timeout=30, headers={"authorization": f"Bearer {per_minute}"}) as client:
                answers = await asyncio.gather(
                    *(client.post(urls[i % 2] + "/v1/completions", json=body) for i in range(40))
                )
            return [a.status_code for a in answers]

        codes = asyncio.run(burst())
        assert sorted(codes) == [200] * 12 + [429] * 28

        async def streams() -> list[int]:
            body = {"model": "m1", "prompt": "x", "max_tokens": 60, "stream": True}  # 3 s each
            headers = {"authorization": f"Bearer {in_flight}"}
            async with httpx.AsyncClient(timeout=30, headers=headers) as client:

                async def one(i: int) -> int:
                    await asyncio.sleep(0.05 * i)  # all ten start within half a second, while the first hold on
                    async with client.stream("POST", urls[i % 2] + "/v1/completions", json=body) as response:
                        await response.aread()
                        return response.status_code

                return list(await asyncio.gather(*(one(i) for i in range(10))))

        assert sorted(asyncio.run(streams())) == [200] * 3 + [429] * 7
    finally:
        for process in (*gateways, engine):
            process.send_signal(signal.SIGTERM)
        for process in (*gateways, engine):
            process.wait(30)


def test_spend_budgets_hold_on_postgres_across_connections(postgres_url: str) -> None:
    """Eight connections (as eight gateways would hold) race to hold $0.07 each against a $1 hard cap: the
    budget's row lock lets exactly 14 through; settling one with its ledger row moves it to spend."""
    db = connect(postgres_url)
    name = f"team-{uuid.uuid4().hex[:8]}"
    set_budget(db, name, daily_usd=1.0, hard=True)
    won = race_for_holds(postgres_url, name)
    assert len(won) == 14
    ledger = Ledger(db)
    row = UsageRecord(won[0].at, None, "m1", "/v1/completions", 200, 5, 6, None, 1.0, None, cost_usd=0.05)

    async def settle() -> None:
        await ledger.record(row, BudgetKeeper(db).settlement(won[0], 0.05))

    asyncio.run(settle())
    ledger.close()
    spent = db.query("SELECT period, spent_usd FROM budget_spend WHERE budget = ? ORDER BY period", (name,))
    held = db.query("SELECT COUNT(*), SUM(usd) FROM budget_holds WHERE budget = ?", (name,))
    db.close()
    assert [s for _, s in spent] == [0.05, 0.05] and len({p for p, _ in spent}) == 2  # the month and the day
    assert held[0][0] == 13 and held[0][1] == pytest.approx(0.91)
