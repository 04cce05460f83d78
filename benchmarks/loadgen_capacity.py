"""How much load one load-generator process drives: concurrent streams and token events per second it
receives against the synthetic SSE server, and whether it keeps its schedule (probe lag p99 < 10 ms).

    .venv/bin/python benchmarks/loadgen_capacity.py --concurrency 16,64,128,256 --gap-ms 10

Each stream gets an event every GAP ms, so the ideal event rate is concurrency x 1000 / GAP per second;
the ratio printed is received / ideal, measured in the same run. The server runs in this process (threads),
the load generator in its own (`deploykit loadtest`), as in real use. On a 2-core machine both share the
cores, so the figure is a floor for a machine where the generator has a core to itself.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fakes.sse_server import serve_sse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="16,64,128,256")
    parser.add_argument("--gap-ms", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--output-tokens", type=int, default=100)
    args = parser.parse_args()
    server = serve_sse(ttft_s=args.gap_ms / 1000, gap_s=args.gap_ms / 1000)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    print(f"{'streams':>8} {'events/s':>10} {'ideal/s':>9} {'ratio':>6} {'lag p99':>9} {'cpu %':>6} {'valid':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for c in (int(x) for x in args.concurrency.split(",")):
            out = Path(tmp) / f"c{c}.json"
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "deploykit",
                    "loadtest",
                    "run",
                    url,
                    "--model",
                    "synth",
                    "-c",
                    str(c),
                    "--duration",
                    str(args.duration),
                    "--warmup",
                    "2",
                    "--output-tokens",
                    str(args.output_tokens),
                    "--out",
                    str(out),
                    "--json",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            report = json.loads(out.read_text())
            ideal = c * 1000 / args.gap_ms
            # events received over the whole run (warm-up included), per second of it
            received = sum(len(r["events"]) for r in report["records"]) / args.duration
            lag = report["schedule_lag"]["p99"] * 1000 if report["schedule_lag"] else float("nan")
            print(
                f"{c:>8} {received:>10.0f} {ideal:>9.0f} {received / ideal:>6.2f} {lag:>7.1f}ms "
                f"{report['generator_cpu_percent']:>6.0f} {report['valid']!s:>6}"
            )
    server.shutdown()


if __name__ == "__main__":
    main()
