"""Keys and the ledger on a real PostgreSQL server (started here from the machine's PostgreSQL install),
the shared database several gateways use."""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deploykit.ports import free_port
from deploykit.serve.gateway import Backend, create_app
from deploykit.serve.gateway.app import GatewayOptions
from deploykit.serve.gateway.auth import create_key, list_keys, revoke_key
from deploykit.serve.gateway.database import MIGRATIONS, connect, migrate
from deploykit.serve.gateway.ledger import DeploymentLog, deployment_hours, usage_by
from deploykit.serve.gateway.proxy import engine_session
from tests.fakes.engine import PROMPT_TOKENS


def _pg_bin() -> Path | None:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))[-1:]), None)
    return Path(found).resolve().parent if found else None


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # postgres refuses to run as root
    data = Path(tempfile.mkdtemp(prefix="deploykit-pg-"))
    if as_user:
        shutil.chown(data, "postgres", "postgres")
    subprocess.run(
        [*as_user, bindir / "initdb", "-D", data, "-U", "deploykit", "--auth=trust"], check=True, capture_output=True
    )
    port = free_port()
    server = subprocess.Popen(
        [*as_user, bindir / "postgres", "-D", data, "-p", str(port), "-k", data, "-c", "listen_addresses=127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"postgresql://deploykit@127.0.0.1:{port}/postgres"
    deadline = time.monotonic() + 30
    while subprocess.run([bindir / "pg_isready", "-h", "127.0.0.1", "-p", str(port)], capture_output=True).returncode:
        assert server.poll() is None and time.monotonic() < deadline, "PostgreSQL did not start"
        time.sleep(0.2)
    yield url
    server.terminate()
    server.wait(30)
    shutil.rmtree(data, ignore_errors=True)


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
