"""Start the load generator in a process of its own (see __main__) and read back its result; sweeps and
searches over load levels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Literal

from deploykit.core.errors import LoadTestError, UsageError
from deploykit.core.slo import parse_slos
from deploykit.loadtests.config import LoadTestConfig
from deploykit.loadtests.results import Curve, LevelResult, RunResult, Search


def run_in_own_process(config: LoadTestConfig, out: Path, csv: Path | None = None) -> RunResult:
    """Run the load test in a process of its own (with `config.processes` > 1, the master of that many locust
    workers). Returns the result without its per-request records (they are in `out`)."""
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "deploykit.loadtests", "-", str(out)]  # the config (and its key) on stdin
    code = subprocess.run(
        [*command, str(csv)] if csv else command, input=config.model_dump_json(), text=True
    ).returncode
    if code or not out.exists():
        raise LoadTestError(f"The load generator failed (exit {code}).", "Its output is above.")
    return RunResult.read(out)


def run_level(config: LoadTestConfig, point: float, out: Path, csv: Path | None = None) -> LevelResult:
    """One run at a load level (concurrency for a closed loop, rate for an open one); its full report is
    written beside `out` (name-c4.json, name-r2.5.json)."""
    if config.rate is None:
        level, suffix = config.model_copy(update={"concurrency": int(point)}), f"c{int(point)}"
    else:
        level, suffix = config.model_copy(update={"rate": point}), f"r{point:g}"
    path = out.with_name(f"{out.stem}-{suffix}{out.suffix}")
    point_csv = csv.with_name(f"{csv.stem}-{suffix}{csv.suffix}") if csv else None
    result = run_in_own_process(level, path, point_csv)
    return LevelResult(**result.model_dump(), load=point, report=str(path))


def run_sweep(config: LoadTestConfig, points: list[float], out: Path, csv: Path | None = None) -> Curve:
    """One run per load level, in order; `out` holds the curve."""
    curve = Curve(sweep=_kind(config), runs=[run_level(config, point, out, csv) for point in points])
    out.write_text(curve.model_dump_json(indent=1))
    return curve


def find_max(config: LoadTestConfig, out: Path, csv: Path | None = None, limit: float = 512) -> Search:
    """The highest load at which every SLO holds and nothing fails: from the configured level, double until
    a level fails, then bisect between the last pass and the first failure (to one user, or 10% of the
    rate). `out` holds every level tried (the curve that led there) and the answer."""
    if not parse_slos(config.slos):
        raise UsageError("--find-max needs at least one --slo.", "For example: --slo ttft_p95=1s,tpot_p95=50ms")
    runs: list[LevelResult] = []

    def passes(point: float) -> bool:
        run = run_level(config, point, out, csv)
        s = run.summary
        passed = bool(s.ok) and not s.errors and all(s.slos_met.values())
        run = run.model_copy(update={"passed": passed, "tried": len(runs) + 1})
        runs.append(run)
        return bool(run.passed)

    closed = config.rate is None
    level = float(config.concurrency if config.concurrency is not None else config.rate or 1)
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
    search = Search(
        search=_kind(config),
        best=best,
        limit_reached=failed is None,
        slos=config.slos,
        runs=sorted(runs, key=lambda r: r.load),
    )
    out.write_text(search.model_dump_json(indent=1))
    return search


def _kind(config: LoadTestConfig) -> Literal["concurrency", "rate"]:
    return "concurrency" if config.rate is None else "rate"
