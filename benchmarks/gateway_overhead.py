"""What the gateway costs: the same requests sent straight to the engine and through the gateway.

    python benchmarks/gateway_overhead.py --gateway http://127.0.0.1:8000 --engine http://127.0.0.1:8001 \\
        --model smollm2-135m --concurrency 1,32 --rounds 4

Start the gateway with a known engine port first: `deploykit serve --engine-port 8001`. Rounds
alternate direct and gateway batches so that drift on a noisy machine hits both alike. Every request
streams a fixed number of tokens (ignore_eos); TTFT and end-to-end latency are taken per request.
Prints, per concurrency: p50/p99 of each, the latency the gateway adds, and the throughput ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Sample:
    ttft: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    tokens: int = 0
    wall: float = 0.0


async def one(client: httpx.AsyncClient, url: str, body: dict[str, object], sample: Sample) -> None:
    start = time.perf_counter()
    first = None
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if first is None and event["choices"] and event["choices"][0]["text"]:
                first = time.perf_counter()
            if event.get("usage"):
                sample.tokens += event["usage"]["completion_tokens"]
    end = time.perf_counter()
    sample.ttft.append((first or end) - start)
    sample.total.append(end - start)


async def batch(client: httpx.AsyncClient, url: str, body: dict[str, object], n: int, sample: Sample) -> None:
    start = time.perf_counter()
    await asyncio.gather(*(one(client, url, body, sample) for _ in range(n)))
    sample.wall += time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", required=True)
    parser.add_argument("--engine", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=0, help="per batch (default: 4 x concurrency, at least 8)")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    body = {
        "model": args.model,
        "prompt": "The capital of France is",
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await batch(client, args.engine, body, 4, Sample())  # warm both paths
        await batch(client, args.gateway, body, 4, Sample())
        print(f"{'streams':>7} {'path':>8} {'ttft p50':>9} {'ttft p99':>9} {'e2e p50':>9} {'e2e p99':>9} {'tok/s':>8}")
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            n = args.requests or max(8, 4 * concurrency)
            direct, gateway = Sample(), Sample()
            for r in range(args.rounds):
                # a bounded-concurrency batch: n requests, `concurrency` at a time
                for path, sample in ((args.engine, direct), (args.gateway, gateway))[:: 1 if r % 2 == 0 else -1]:
                    for i in range(0, n, concurrency):
                        await batch(client, path, body, min(concurrency, n - i), sample)
            for name, s in (("direct", direct), ("gateway", gateway)):
                print(
                    f"{concurrency:>7} {name:>8} {pct(s.ttft, 50) * 1e3:>8.1f}ms {pct(s.ttft, 99) * 1e3:>8.1f}ms "
                    f"{pct(s.total, 50) * 1e3:>8.1f}ms {pct(s.total, 99) * 1e3:>8.1f}ms {s.tokens / s.wall:>8.1f}"
                )
            print(
                f"{concurrency:>7} {'added':>8} {(pct(gateway.ttft, 50) - pct(direct.ttft, 50)) * 1e3:>8.1f}ms "
                f"{(pct(gateway.ttft, 99) - pct(direct.ttft, 99)) * 1e3:>8.1f}ms "
                f"{(pct(gateway.total, 50) - pct(direct.total, 50)) * 1e3:>8.1f}ms "
                f"{(pct(gateway.total, 99) - pct(direct.total, 99)) * 1e3:>8.1f}ms "
                f"ratio {(gateway.tokens / gateway.wall) / (direct.tokens / direct.wall):.3f}"
            )


if __name__ == "__main__":
    asyncio.run(main())
