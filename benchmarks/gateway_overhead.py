"""What the gateway costs: the same streams sent straight to the upstream and through the gateway.

    python -m benchmarks.gateway_overhead [--concurrency 1,64,256] [--round-s 8] [--rounds 4]
    python -m benchmarks.gateway_overhead --soak 600 --concurrency 64
    python -m benchmarks.gateway_overhead --pin    # the gateway on a core of its own

By default it starts its own fast upstream (benchmarks/fast_upstream.py: a known token schedule at
almost no CPU cost) and a gateway in front of it with everything on: API key auth, quotas on that key,
the SQLite ledger and metrics. --features turns on what issue #18 added, any of: budget (the key has a hard
spend budget, held and settled per request in the database), priority (the high tier), price (requests are
priced, --token-price), queue (the fair queue, with a cap no run reaches), prefix (prefix routing) and traces
(every request an OpenTelemetry trace exported over OTLP/HTTP to a sink in this process; the SDK's
OTEL_TRACES_SAMPLER settings in the environment apply); --features all (or --all-features) is all six:
    python -m benchmarks.gateway_overhead --features budget,traces --concurrency 1,64
Against a running deployment instead:
    deploykit serve --engine-port 8001 ...
    python -m benchmarks.gateway_overhead --gateway http://127.0.0.1:8000 --upstream http://127.0.0.1:8001 \\
        --model smollm2-135m --key dk-...

Closed loop: C workers, each with one keep-alive connection, send streaming completions back to back
for a round of ROUND_S seconds, their first requests spread evenly over one request's duration so that
C streams are in flight with starts spread in time (--burst: all start together, and, every request being
the same length, keep arriving in bursts of C). Rounds alternate direct and gateway (drift on a noisy machine hits both
alike). Prints per concurrency: TTFT and end-to-end p50/p99 of each path, the latency the gateway adds
(gateway pXX - direct pXX), the throughput ratio (gateway tokens/s / direct tokens/s) and the gateway
process's CPU use. --soak runs the gateway path alone for SOAK seconds and prints the gateway's RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psutil

_TEXT, _EMPTY = b'"text":"', b'"text":""'
_END = b"\r\n0\r\n\r\n"  # the last chunk of a chunked response


@dataclass
class Sample:
    concurrency: int = 1
    ttft: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    tokens: int = 0
    wall: float = 0.0
    errors: int = 0
    gateway_cpu_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Each worker is always busy with one request, so throughput = C x tokens / time spent in requests
        (unlike tokens / wall time, this does not depend on how many whole requests fit in a round)."""
        return self.concurrency * self.tokens / sum(self.total)


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    request: bytes  # the whole HTTP request, sent as is

    @classmethod
    def of(cls, url: str, body: dict[str, object], headers: dict[str, str]) -> Target:
        parts = urlsplit(url)
        raw = json.dumps(body).encode()
        lines = [
            "POST /v1/completions HTTP/1.1",
            f"host: {parts.netloc}",
            "content-type: application/json",
            f"content-length: {len(raw)}",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        return cls(parts.hostname or "127.0.0.1", parts.port or 80, ("\r\n".join(lines) + "\r\n\r\n").encode() + raw)


def _tokens(data: bytes) -> int:
    """Completion events that carry text (one token each from the fast upstream; vLLM's are tokens too)."""
    return data.count(_TEXT) - data.count(_EMPTY)


async def _worker(target: Target, until: float, sample: Sample, delay: float = 0.0) -> None:
    """After `delay`, send streaming requests back to back on one connection until `until`; time each one."""
    await asyncio.sleep(delay)
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        while time.perf_counter() < until:
            start = time.perf_counter()
            writer.write(target.request)
            first, buffer = None, b""
            while not buffer.endswith(_END):
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("the server closed the connection")
                if first is None and _tokens(data):
                    first = time.perf_counter()
                buffer += data
            end = time.perf_counter()
            if not buffer.startswith(b"HTTP/1.1 200"):
                sample.errors += 1
                continue
            sample.ttft.append((first or end) - start)
            sample.total.append(end - start)
            sample.tokens += _tokens(buffer)
    finally:
        writer.close()


async def run_round(target: Target, concurrency: int, seconds: float, sample: Sample, spread: float = 0.0) -> None:
    """`concurrency` workers for `seconds`. With `spread` (one request's duration), their first requests are
    spaced evenly over it, so that starts stay spread as in real traffic; without, they start, end and
    start again together: every request of a round arrives in the same instant (the worst case)."""
    start = time.perf_counter()
    await asyncio.gather(
        *(_worker(target, start + seconds, sample, spread * i / concurrency) for i in range(concurrency))
    )
    sample.wall += time.perf_counter() - start


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def _cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _wait_http(url: str, timeout: float = 30) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer")


FEATURES = ("budget", "priority", "price", "queue", "prefix", "traces")


def start_stack(
    ttft: float, gap: float, features: frozenset[str]
) -> tuple[list[subprocess.Popen[bytes]], str, str, str]:
    """Start the fast upstream and a gateway in front of it: (processes, upstream url, gateway url, API key)."""
    from deploykit.core.ports import free_port
    from deploykit.serve.accounting.budgets import set_budget
    from deploykit.serve.accounting.database import opened
    from deploykit.serve.accounting.keys import create_key

    home = Path(tempfile.mkdtemp(prefix="deploykit-bench-"))
    db_url = f"sqlite:///{home / 'deploykit.db'}"
    with opened(db_url) as db:
        limits = {"rpm": 10_000_000, "tpm": 1_000_000_000, "max_concurrent": 100_000}
        tier = {"priority": "high"} if "priority" in features else {}
        _, token = create_key(db, "bench", **limits, **tier)  # type: ignore[arg-type]
        if "budget" in features:
            set_budget(db, "bench", monthly_usd=1e9, hard=True)
    env = dict(os.environ)
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    if "traces" in features:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp_sink()
    up_port, gw_port = free_port(), free_port()
    upstream = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.fast_upstream",
            "--port",
            str(up_port),
            "--ttft",
            str(ttft),
            "--gap",
            str(gap),
        ]
    )
    serve = ["--serve-gateway", str(gw_port), str(up_port), db_url, ",".join(sorted(features)) or "base"]
    gateway = subprocess.Popen([sys.executable, "-m", "benchmarks.gateway_overhead", *serve], env=env)
    up, gw = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{gw_port}"
    _wait_http(up + "/v1/models")
    _wait_http(gw + "/health")
    return [upstream, gateway], up, gw, token


def otlp_sink() -> str:
    """An OTLP/HTTP endpoint that takes every export and drops it (a thread of this process); its URL."""
    import http.server
    import threading

    class Sink(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}"


def serve_gateway(port: int, upstream_port: int, db_url: str, features: frozenset[str]) -> None:
    """The gateway process: auth on, the ledger in db_url, metrics as always, and the named `features`."""
    import uvicorn
    import uvloop

    from deploykit.core.quiet import quiet_gc
    from deploykit.serve.accounting.budgets import Price
    from deploykit.serve.accounting.database import connect
    from deploykit.serve.gateway import Backend, create_app
    from deploykit.serve.gateway.app import GatewayOptions
    from deploykit.serve.gateway.proxy import engine_session

    async def main() -> None:
        async with engine_session() as session:
            backend = Backend("fast", f"http://127.0.0.1:{upstream_port}", session, status="ready")
            priced = {"budget", "price"} & features  # a budget needs a price
            options = GatewayOptions(
                auth=True,
                token_prices={"fast": Price(0.1, 0.4)} if priced else {},
                max_concurrent=100_000 if "queue" in features else None,
                priority_models=frozenset({"fast"}) if "priority" in features else frozenset(),
                prefix_routing="prefix" in features,
            )
            app = create_app([backend], connect(db_url), options)
            config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
            quiet_gc()  # as deploykit serve does
            await uvicorn.Server(config).serve()
            app.state.gateway.close()

    uvloop.run(main())


async def compare(args: argparse.Namespace, upstream: str, gateway: str, token: str, gateway_pid: int | None) -> None:
    body = {
        "model": args.model,
        "prompt": "The capital of France is",
        "max_tokens": args.max_tokens,
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,
    }
    direct_t = Target.of(upstream, body, {})
    gateway_t = Target.of(gateway, body, {"authorization": f"Bearer {token}"} if token else {})
    spread = 0.0 if args.burst else args.ttft + args.max_tokens * args.gap
    await run_round(direct_t, 4, 1.0, Sample())  # warm both paths
    await run_round(gateway_t, 4, 1.0, Sample())
    print(f"{'streams':>7} {'path':>8} {'ttft p50':>9} {'ttft p99':>9} {'e2e p50':>9} {'e2e p99':>9} {'tok/s':>9}")
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        direct, through = Sample(concurrency), Sample(concurrency)
        for r in range(args.rounds):
            pair = ((direct_t, direct), (gateway_t, through))
            for target, sample in pair[:: 1 if r % 2 == 0 else -1]:
                cpu = _cpu_s(gateway_pid)
                await run_round(target, concurrency, args.round_s, sample, spread)
                sample.gateway_cpu_s += _cpu_s(gateway_pid) - cpu
        for name, s in (("direct", direct), ("gateway", through)):
            print(
                f"{concurrency:>7} {name:>8} {pct(s.ttft, 50) * 1e3:>8.1f}ms {pct(s.ttft, 99) * 1e3:>8.1f}ms "
                f"{pct(s.total, 50) * 1e3:>8.1f}ms {pct(s.total, 99) * 1e3:>8.1f}ms {s.tokens_per_s:>9.1f}"
                f"  ({len(s.total)} requests"
                + (f", {s.errors} errors" if s.errors else "")
                + (f", gateway CPU {s.gateway_cpu_s / s.wall:.0%}" if gateway_pid else "")
                + ")"
            )
        print(
            f"{concurrency:>7} {'added':>8} {(pct(through.ttft, 50) - pct(direct.ttft, 50)) * 1e3:>8.1f}ms "
            f"{(pct(through.ttft, 99) - pct(direct.ttft, 99)) * 1e3:>8.1f}ms "
            f"{(pct(through.total, 50) - pct(direct.total, 50)) * 1e3:>8.1f}ms "
            f"{(pct(through.total, 99) - pct(direct.total, 99)) * 1e3:>8.1f}ms "
            f"ratio {through.tokens_per_s / direct.tokens_per_s:.3f}",
            flush=True,
        )


async def soak(args: argparse.Namespace, gateway: str, token: str, pid: int) -> None:
    body = {"model": args.model, "prompt": "x", "max_tokens": args.max_tokens, "stream": True}
    target = Target.of(gateway, body, {"authorization": f"Bearer {token}"})
    proc = psutil.Process(pid)
    concurrency = int(args.concurrency.split(",")[-1])
    started = time.monotonic()
    print(f"{'t (s)':>6} {'gateway RSS':>12} {'requests':>9}")
    sample = Sample(concurrency)
    while (elapsed := time.monotonic() - started) < args.soak:
        print(f"{elapsed:>6.0f} {proc.memory_info().rss / 2**20:>8.1f} MiB {len(sample.total):>9}", flush=True)
        await run_round(target, concurrency, min(30.0, args.soak - elapsed), sample)
    rss = proc.memory_info().rss / 2**20
    print(f"{args.soak:>6.0f} {rss:>8.1f} MiB {len(sample.total):>9}  errors {sample.errors}", flush=True)


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--serve-gateway":
        serve_gateway(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], frozenset(sys.argv[5].split(",")))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,64,256")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--round-s", type=float, default=8.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--ttft", type=float, default=0.1, help="the fast upstream's time to first token (s)")
    parser.add_argument("--gap", type=float, default=0.05, help="the fast upstream's gap between tokens (s)")
    parser.add_argument("--soak", type=float, default=0.0, help="seconds of gateway-only load; prints RSS")
    parser.add_argument("--gateway", help="a running gateway (with --upstream) instead of starting both")
    parser.add_argument("--upstream", help="the engine behind --gateway")
    parser.add_argument("--model", default="fast")
    parser.add_argument("--key", default=os.environ.get("DEPLOYKIT_API_KEY", ""), help="API key for --gateway")
    parser.add_argument(
        "--burst",
        action="store_true",
        help="start every stream at once (they then end and restart together): the worst case",
    )
    parser.add_argument(
        "--features",
        default="",
        help=f"comma-separated, on top of the base gateway: {','.join(FEATURES)}, or all",
    )
    parser.add_argument("--all-features", action="store_true", help="the same as --features all")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="give the gateway the last core to itself; the client and the upstream share the others",
    )
    args = parser.parse_args()
    named = FEATURES if args.all_features or args.features == "all" else filter(None, args.features.split(","))
    features = frozenset(named)
    if unknown := features - set(FEATURES):
        parser.error(f"unknown feature(s) {', '.join(sorted(unknown))}; choose from {', '.join(FEATURES)}")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if args.gateway:
            upstream, gateway, token, pid = args.upstream, args.gateway, args.key, None
        else:
            procs, upstream, gateway, token = start_stack(args.ttft, args.gap, features)
            pid = procs[1].pid
            if args.pin:
                cores = sorted(os.sched_getaffinity(0))
                if len(cores) < 2:
                    raise SystemExit("--pin needs at least 2 cores")
                psutil.Process(pid).cpu_affinity(cores[-1:])
                for other in (procs[0].pid, os.getpid()):
                    psutil.Process(other).cpu_affinity(cores[:-1])
                print(f"gateway pinned to core {cores[-1]}; client and upstream on {cores[:-1]}", flush=True)
            print(
                f"fast upstream: TTFT {args.ttft * 1e3:.0f} ms, a token every {args.gap * 1e3:.0f} ms, "
                f"{args.max_tokens} tokens; gateway with auth, quotas, ledger and metrics on",
                flush=True,
            )
        if args.soak:
            if pid is None:
                raise SystemExit("--soak measures the gateway it starts; leave out --gateway")
            asyncio.run(soak(args, gateway, token, pid))
        else:
            asyncio.run(compare(args, upstream, gateway, token, pid))
    finally:
        for p in procs:
            p.terminate()
            p.wait()


if __name__ == "__main__":
    main()
