"""Priority tiers under saturation, on real processes: `deploykit serve --engine ... --max-concurrent-streams 4`
in front of a fake engine process whose answers take 1 s. A batch key sends far more streams than the
gateway lets through: three run, the queue takes what it holds and the rest get 429 at once; a
high-priority key's requests still start at once, never waiting for a batch stream to end."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from deploykit.core.ports import free_port
from deploykit.loadtests.metrics import percentile
from tests.waiting import ready, until

REPO = Path(__file__).resolve().parents[2]


def test_a_high_priority_key_starts_at_once_while_a_batch_key_floods_the_gateway(tmp_path: Path, engine: str) -> None:
    env = {**os.environ, "DEPLOYKIT_HOME": str(tmp_path)}

    def key(name: str, priority: str) -> str:
        made = subprocess.run(
            [sys.executable, "-m", "deploykit", "keys", "create", "--name", name, "--priority", priority, "--json"],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        assert json.loads(made.stdout)["priority"] == priority
        return str(json.loads(made.stdout)["key"])

    batch, high = key("evals", "batch"), key("app", "high")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = [sys.executable, "-m", "deploykit", "serve", "--port", str(port), f"--engine=m1={engine}", "--auth"]
    serve += ["--max-concurrent-streams", "4", "--queue-timeout", "60"]
    gateway = subprocess.Popen(serve, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        until(lambda: ready(url), "never ready")

        async def run() -> tuple[list[int], list[float]]:
            async with httpx.AsyncClient(timeout=90) as client:

                async def ttft(token: str, max_tokens: int) -> tuple[int, float]:
                    body = {"model": "m1", "prompt": "x", "max_tokens": max_tokens, "stream": True}
                    started = time.monotonic()
                    headers = {"authorization": f"Bearer {token}"}
                    first = None
                    async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as answer:
                        async for _ in answer.aiter_bytes():  # to the end: a client that leaves frees its slot
                            first = first or time.monotonic() - started
                    return answer.status_code, first or 0.0

                flood = [asyncio.create_task(ttft(batch, 20)) for _ in range(40)]  # 1 s each, 3 at a time
                await asyncio.sleep(0.5)
                highs = [(await ttft(high, 2))[1] for _ in range(12)]
                codes = [code for code, _ in await asyncio.gather(*flood)]
                return codes, highs

        codes, highs = asyncio.run(run())
        metrics = httpx.get(url + "/metrics").text
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(60)
    # the high key never waits for a batch stream to end (1 s): a quarter of the slots is kept from batch
    assert percentile(sorted(highs), 95) < 0.5, highs
    assert (codes.count(200), codes.count(429)) == (35, 5)  # 3 running + 32 queued (8 x the cap); 5 shed
    assert 'deploykit_requests_total{key="app",model="m1",status="200"} 12.0' in metrics
