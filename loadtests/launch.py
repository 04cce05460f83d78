"""Start the load generator in a process of its own (see __main__) and read back its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from deploykit.errors import DeploykitError, UsageError
from deploykit.loadtests.config import LoadTestConfig
from deploykit.loadtests.metrics import parse_slos


class LoadTestError(DeploykitError):
    exit_code = 6


def run_in_own_process(config: LoadTestConfig, out: Path, csv: Path | None = None) -> dict[str, object]:
    """Run the load test in a process of its own (with `config.processes` > 1, the master of that many locust
    workers). Returns the report without its per-request records (they are in `out`)."""
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "deploykit.loadtests", config.model_dump_json(), str(out)]
    code = subprocess.run([*command, str(csv)] if csv else command).returncode
    if code or not out.exists():
        raise LoadTestError(f"The load generator failed (exit {code}).", "Its output is above.")
    report: dict[str, object] = json.loads(out.read_text())
    report.pop("records", None)
    return report


def run_level(config: LoadTestConfig, point: float, out: Path, csv: Path | None = None) -> dict[str, object]:
    """One run at a load level (concurrency for a closed loop, rate for an open one); its full report is
    written beside `out` (name-c4.json, name-r2.5.json)."""
    if config.rate is None:
        level, suffix = config.model_copy(update={"concurrency": int(point)}), f"c{int(point)}"
    else:
        level, suffix = config.model_copy(update={"rate": point}), f"r{point:g}"
    path = out.with_name(f"{out.stem}-{suffix}{out.suffix}")
    point_csv = csv.with_name(f"{csv.stem}-{suffix}{csv.suffix}") if csv else None
    return {"load": point, "report": str(path), **run_in_own_process(level, path, point_csv)}


def run_sweep(config: LoadTestConfig, points: list[float], out: Path, csv: Path | None = None) -> dict[str, object]:
    """One run per load level, in order; `out` holds the curve."""
    runs = [run_level(config, point, out, csv) for point in points]
    curve: dict[str, object] = {"sweep": _kind(config), "runs": runs}
    out.write_text(json.dumps(curve, indent=1))
    return curve


def find_max(config: LoadTestConfig, out: Path, csv: Path | None = None, limit: float = 512) -> dict[str, object]:
    """The highest load at which every SLO holds and nothing fails: from the configured level, double until
    a level fails, then bisect between the last pass and the first failure (to one user, or 10% of the
    rate). `out` holds every level tried (the curve that led there) and the answer."""
    if not parse_slos(config.slos):
        raise UsageError("--find-max needs at least one --slo.", "For example: --slo ttft_p95=1s,tpot_p95=50ms")
    runs: list[dict[str, object]] = []

    def passes(point: float) -> bool:
        run = run_level(config, point, out, csv)
        summary: dict[str, Any] = run["summary"]  # type: ignore[assignment]
        run["passed"] = bool(summary["ok"]) and not summary["errors"] and all(summary["slos_met"].values())
        runs.append(run)
        return bool(run["passed"])

    closed = config.rate is None
    level: float = float(config.concurrency if closed else config.rate)  # type: ignore[arg-type]
    best: float | None = None
    failed: float | None = None
    while level <= limit:
        if not passes(level):
            failed = level
            break
        best, level = level, level * 2
    while best is not None and failed is not None and (failed - best > 1 if closed else failed / best > 1.1):
        middle = (best + failed) // 2 if closed else (best + failed) / 2
        if passes(middle):
            best = middle
        else:
            failed = middle
    result: dict[str, object] = {
        "search": _kind(config),
        "best": best,
        "limit_reached": failed is None,
        "slos": config.slos,
        "runs": sorted(runs, key=lambda r: float(r["load"])),  # type: ignore[arg-type]
    }
    out.write_text(json.dumps(result, indent=1))
    return result


def _kind(config: LoadTestConfig) -> str:
    return "concurrency" if config.rate is None else "rate"
