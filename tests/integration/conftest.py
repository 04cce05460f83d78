"""Fixtures of the integration tests: a real PostgreSQL server for the tests that share one database between
gateways, and a fake engine process."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploykit.core.ports import free_port


def _pg_bin() -> Path | None:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))[-1:]), None)
    return Path(found).resolve().parent if found else None


def _as_postgres() -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the postgres user (runuser by absolute path)."""
    if os.geteuid() != 0:
        return []
    runuser = next((p for p in ("/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser") if os.path.exists(p)), None)
    if runuser is None:
        pytest.fail("Running as root and runuser is missing: PostgreSQL cannot be started for the tests.")
    return [runuser, "-u", "postgres", "--"]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """DEPLOYKIT_DATABASE_URL when it names a PostgreSQL server, else one started here from the machine's
    install. Missing PostgreSQL skips these tests on a workstation and fails them in CI (CI=true)."""
    given = os.environ.get("DEPLOYKIT_DATABASE_URL", "")
    if given.startswith(("postgresql://", "postgres://")):
        yield given
        return
    bindir = _pg_bin()
    if bindir is None:
        why = "PostgreSQL is not installed (Debian: apt-get install postgresql)"
        if os.environ.get("CI") == "true":
            pytest.fail(why + "; CI must run these tests.")
        pytest.skip(why)
    as_user = _as_postgres()
    data = Path(tempfile.mkdtemp(prefix="deploykit-pg-"))
    server: subprocess.Popen[bytes] | None = None
    try:
        if as_user:
            shutil.chown(data, "postgres", "postgres")
        subprocess.run(
            [*as_user, bindir / "initdb", "-D", data, "-U", "deploykit", "--auth=trust"],
            check=True,
            capture_output=True,
        )
        port = free_port()
        server = subprocess.Popen(
            [
                *as_user,
                bindir / "postgres",
                "-D",
                data,
                "-p",
                str(port),
                "-k",
                data,
                "-c",
                "listen_addresses=127.0.0.1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while subprocess.run(
            [bindir / "pg_isready", "-h", "127.0.0.1", "-p", str(port)], capture_output=True
        ).returncode:
            assert server.poll() is None and time.monotonic() < deadline, "PostgreSQL did not start"
            time.sleep(0.2)
        yield f"postgresql://deploykit@127.0.0.1:{port}/postgres"
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def engine() -> Iterator[str]:
    """A fake engine process serving m1 at 50 ms a token (with vLLM's runtime LoRA routes on)."""
    port = free_port()
    fake = [sys.executable, "-m", "tests.fakes.engine", "--model", "m1", "--token-delay", "0.05", "--port", str(port)]
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    repo = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(fake, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield f"http://127.0.0.1:{port}"
    process.kill()
    process.wait()
