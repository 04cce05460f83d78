"""The sizing model against the CPU engine on this machine: predict, measure with `deploykit loadtest`,
calibrate from one run, predict the others again.

    deploykit serve smollm2-135m --engine-port 8001 &
    .venv/bin/python -m benchmarks.sizing_cpu --url http://127.0.0.1:8001 --levels 1,2,4,8,16 --base 2,4,8

Each level is a closed-loop run with fixed lengths (64-token prompts, 32-token answers) of --cycles
requests per stream, after a warm-up run of one request per stream that is not measured. Throughput is
C x output tokens / median end-to-end time, the steady state of a closed loop. Prints the KV cache the model
predicts for the engine (vLLM logs its own), the analytic prediction's error, and the error after calibrating
from each --base run alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploykit.models.catalog import load_catalog
from deploykit.sizing.calibration import calibrate
from deploykit.sizing.hardware import Accelerator, kv_tokens_on, measure_cpu
from deploykit.sizing.performance import closed_loop_point

INPUT, OUTPUT = 64, 32


@dataclass(frozen=True)
class Level:
    concurrency: int
    measured_tps: float
    analytic_tps: float
    calibrated_tps: float
    measured_tpot_s: float
    calibrated_tpot_s: float

    @property
    def analytic_error(self) -> float:
        return self.analytic_tps / self.measured_tps - 1

    @property
    def calibrated_error(self) -> float:
        return self.calibrated_tps / self.measured_tps - 1


def run_level(url: str, model: str, c: int, cycles: int, out: Path) -> Path:
    """A warm-up of one request per stream, overwritten (the engine compiles each new batch size on its first
    batches), then the measured run of `cycles` requests per stream. Counted in requests, not seconds: on a
    slow machine one closed-loop cycle at high concurrency outlasts any window chosen in advance, and a run
    in which no request finished measures nothing."""
    path = out / f"c{c}.json"
    loadtest = [sys.executable, "-m", "deploykit", "loadtest", "run", url, "--model", model, "-c", str(c),
                "--input-tokens", str(INPUT), "--output-tokens", str(OUTPUT), "--hardware", "cpu",
                "--duration", "900", "--out", str(path), "--json"]  # fmt: skip
    for requests in (c, max(cycles * c, 8)):
        subprocess.run([*loadtest, "--requests", str(requests)], check=True, capture_output=True, timeout=960)
    return path


def measure(url: str, model: str, levels: list[int], cycles: int, out: Path) -> dict[int, Path]:
    """One closed-loop `deploykit loadtest` per level; their reports."""
    return {c: run_level(url, model, c, cycles, out) for c in levels}


def compare_levels(reports: dict[int, Path], model: str, base: int, cpu: Accelerator) -> list[Level]:
    """Calibrate from the `base` run only; each level's measured, analytic and calibrated throughput."""
    config = load_catalog().get(model).config()
    calibration = calibrate(reports[base], model, config, {"cpu": cpu})
    rows = []
    for c, path in reports.items():
        summary = json.loads(path.read_text())["summary"]
        analytic = closed_loop_point(config, cpu, 1, c, INPUT, OUTPUT)
        calibrated = closed_loop_point(config, cpu, 1, c, INPUT, OUTPUT, calibration)
        rows.append(
            Level(
                c,
                c * OUTPUT / summary["e2e"]["p50"],
                c * OUTPUT / analytic.e2e_s(OUTPUT),
                c * OUTPUT / calibrated.e2e_s(OUTPUT),
                summary["tpot"]["p50"],
                calibrated.tpot_s,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8001")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--levels", default="1,2,4,8,16")
    parser.add_argument("--base", default="2,4,8", help="The runs to calibrate from, one at a time.")
    parser.add_argument("--cycles", type=int, default=3, help="Measured requests per stream at each level.")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        reports = measure(args.url, args.model, levels, args.cycles, Path(tmp))
        cpu = measure_cpu()  # after the runs, on an idle engine
        kv = kv_tokens_on(load_catalog().get(args.model).config(), cpu, 1)
        print(f"this CPU: {cpu.bandwidth / 1e9:.1f} GB/s, {cpu.flops / 1e9:.1f} GFLOP/s on the engine's cores")
        print(f"KV cache predicted: {kv:,} tokens (compare the engine log's 'KV cache size')")
        for base in (int(x) for x in args.base.split(",")):
            print(f"\ncalibrated from the {base}-stream run only\n")
            print("| streams | measured tok/s | analytic | error | calibrated | error | TPOT measured | calibrated |")
            print("|---|---|---|---|---|---|---|---|")
            for r in compare_levels(reports, args.model, base, cpu):
                print(
                    f"| {r.concurrency} | {r.measured_tps:.1f} | {r.analytic_tps:.1f} | {r.analytic_error:+.0%} | "
                    f"{r.calibrated_tps:.1f} | {r.calibrated_error:+.0%} | {r.measured_tpot_s * 1000:.1f} ms | "
                    f"{r.calibrated_tpot_s * 1000:.1f} ms |"
                )


if __name__ == "__main__":
    main()
