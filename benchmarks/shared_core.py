"""Two CPU engines bound to one core: their threads spinning (OpenMP's default) against sleeping when idle (the
plan's OMP_WAIT_POLICY=PASSIVE for engines that share cores), side by side.

    .venv/bin/python -m benchmarks.shared_core [--streams 1,4] [--tokens 32]

On a machine with no core each for the engines and one for the gateway (2 cores, 2 replicas), the plan binds
both engines to the same cores. For each policy, `deploykit serve smollm2-135m --replicas 2` starts (the
policy set in its environment, which the plan leaves as the user sets it), and at each stream count that
many chat requests of --tokens tokens (ignore_eos) are sent at once through the gateway: output tokens/s,
the median of three batches after one untimed one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import httpx

from benchmarks.serving import smollm2_home, start, wait_ready
from deploykit.core.ports import free_port


async def batch(url: str, streams: int, tokens: int) -> float:
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": tokens, "ignore_eos": True}  # fmt: skip
    async with httpx.AsyncClient(timeout=600) as client:
        began = time.monotonic()
        answers = await asyncio.gather(*(client.post(url + "/v1/chat/completions", json=body) for _ in range(streams)))
        elapsed = time.monotonic() - began
    return sum(a.json()["usage"]["completion_tokens"] for a in answers) / elapsed


def measure(policy: str, streams: list[int], tokens: int) -> dict[int, float]:
    home = smollm2_home("deploykit-shared-core-")
    os.environ["OMP_WAIT_POLICY"] = policy
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = start(home, ["smollm2-135m", "--replicas", "2", "--port", str(port)], home / "serve.log")
    try:
        wait_ready(url, serve, home / "serve.log")
        rates = {}
        for n in streams:
            asyncio.run(batch(url, n, tokens))
            rates[n] = statistics.median(asyncio.run(batch(url, n, tokens)) for _ in range(3))
        return rates
    finally:
        serve.terminate()
        serve.wait(120)
        del os.environ["OMP_WAIT_POLICY"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1,4")  # spinning, more streams take many minutes
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    spinning, sleeping = measure("ACTIVE", streams, args.tokens), measure("PASSIVE", streams, args.tokens)
    print(f"two SmolLM2 engines on one core, {args.tokens}-token answers; output tokens/s, median of 3:")
    print(f"{'streams':>8} {'spinning':>9} {'sleeping':>9} {'ratio':>6}")
    for n in streams:
        print(f"{n:>8} {spinning[n]:>9.1f} {sleeping[n]:>9.1f} {sleeping[n] / spinning[n]:>5.1f}x")


if __name__ == "__main__":
    main()
