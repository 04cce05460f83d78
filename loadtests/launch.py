"""Start the load generator in a process of its own (see __main__) and read back its result; sweeps and
searches over load levels."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
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
    """One run per load level, in order; an open loop stops after the first level its server could not keep
    up with (a higher rate only grows the backlog faster). `out` holds the curve."""
    runs: list[LevelResult] = []
    for point in points:
        runs.append(run_level(config, point, out, csv))
        if config.concurrency is None and runs[-1].saturated:
            break
    curve = Curve(sweep=_kind(config), runs=runs, skipped=[p for p in points[len(runs) :]])
    out.write_text(curve.model_dump_json(indent=1))
    return curve


def find_max(config: LoadTestConfig, out: Path, csv: Path | None = None, limit: float = 512) -> Search:
    """The highest load at which every SLO holds, nothing fails and the server keeps up (no growing queue:
    saturation.py): from the configured level, double until a level fails, then bisect between the last
    pass and the first failure (to one user, or 10% of the rate). Near capacity a queue's growth is hard to
    tell from a long busy spell, so a middle level that failed on its queue alone runs once more, twice as
    long, and counts as passed if its queue then holds (on simulated queues of 20 s levels this takes the
    searches that end within 10% of capacity from 77% to 96%: docs/PERFORMANCE.md). `out` holds every level
    tried (the curve that led there) and the answer."""
    if not parse_slos(config.slos):
        raise UsageError("--find-max needs at least one --slo.", "For example: --slo ttft_p95=1s,tpot_p95=50ms")
    runs: list[LevelResult] = []

    def outcome(point: float, longer: bool) -> str:
        duration = config.duration_s * (2 if longer else 1)
        run = run_level(config.model_copy(update={"duration_s": duration}), point, out, csv)
        s = run.summary
        met = bool(s.ok) and not s.errors and all(s.slos_met.values())
        grows = run.saturated and config.concurrency is None  # a closed loop's queue is bounded: reported only
        runs.append(run.model_copy(update={"passed": met and not grows, "tried": len(runs) + 1}))
        return ("queue" if grows else "pass") if met else "fail"

    start = float(config.concurrency if config.concurrency is not None else config.rate or 1)
    best, failed = search_levels(start, config.rate is None, limit, outcome)
    search = Search(
        search=_kind(config),
        best=best,
        limit_reached=failed is None,
        slos=config.slos,
        runs=sorted(runs, key=lambda r: r.load),
    )
    out.write_text(search.model_dump_json(indent=1))
    return search


def search_levels(
    start: float, closed: bool, limit: float, outcome: Callable[[float, bool], str]
) -> tuple[float | None, float | None]:
    """(the highest level that passed, the lowest that failed): double from `start` until a level fails, then
    bisect to one user (`closed`) or 10% of the rate. `outcome(level, longer)` runs a level and says "pass",
    "fail", or "queue" (met its SLOs but its queue grew); a middle level failed on its queue alone runs once
    more, `longer`, and passes if its queue then holds."""
    best: float | None = None
    failed: float | None = None
    level = start
    while level <= limit:
        if outcome(level, False) != "pass":
            failed = level
            break
        best, level = level, level * 2
    while best is not None and failed is not None and (failed - best > 1 if closed else failed / best > 1.1):
        middle = (best + failed) // 2 if closed else (best + failed) / 2
        first = outcome(middle, False)
        if first == "pass" or (first == "queue" and outcome(middle, True) == "pass"):
            best = middle
        else:
            failed = middle
    return best, failed


def _kind(config: LoadTestConfig) -> Literal["concurrency", "rate"]:
    return "concurrency" if config.rate is None else "rate"
