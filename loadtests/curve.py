"""What a sweep or a search says across its load levels: a row for every level (the terminal's table and the
page's are the same rows) and the knee, the level past which more load buys little more throughput.

The knee is found as Kneedle does for a concave, increasing curve (Satopää et al., "Finding a 'Kneedle' in a
Haystack", ICDCS workshops 2011): output tokens/s against load, both scaled to [0, 1]; the knee is the level
where the curve stands furthest above the straight line from the first level to the last. A curve that
never bends by `MIN_BEND` of its range (throughput still growing with load at the last level) has no knee
in the range tried, and none is claimed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MIN_BEND = 0.2  # how far above the straight line the knee must stand, in units of the scaled ranges


def knee(points: Sequence[tuple[float, float]]) -> int | None:
    """The index of the knee of (load, throughput) points in load order, or None where there is none."""
    if len(points) < 3:
        return None
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x_span, y_span = xs[-1] - xs[0], max(ys) - min(ys)
    if x_span <= 0 or y_span <= 0:
        return None
    bends = [(y - min(ys)) / y_span - (x - xs[0]) / x_span for x, y in points]
    best = max(range(len(points)), key=lambda i: bends[i])
    return best if bends[best] >= MIN_BEND else None


def unit(curve: dict[str, Any]) -> str:
    """The unit of a curve's load levels."""
    return "streams" if (curve.get("sweep") or curve.get("search")) == "concurrency" else "req/s"


def knee_load(curve: dict[str, Any]) -> float | None:
    """The load level at the knee of a sweep's or a search's curve (its JSON), if it has one."""
    runs = sorted(curve["runs"], key=lambda r: r["load"])
    at = knee([(r["load"], r["summary"]["output_tokens_per_s"]) for r in runs])
    return None if at is None else float(runs[at]["load"])


def knee_sentence(curve: dict[str, Any]) -> str:
    """One line on the knee, for the terminal and the page."""
    load = knee_load(curve)
    if load is None:
        return "No knee in the levels tried: throughput still grows with load up to the last one."
    return f"Knee at {load:g} {unit(curve)}: past it, more load buys little more throughput."


def queue_state(run: dict[str, Any]) -> str:
    """A run's queue, as the saturation test judged it: growing (the server did not keep up), steady, or -."""
    verdict = (run.get("saturation") or {}).get("saturated")
    return {True: "growing", False: "steady", None: "-"}[verdict]


def level_rows(curve: dict[str, Any]) -> list[list[str]]:
    """A header and a row per level: a sweep's in the order run, a search's in the order tried (numbered, with
    whether each passed)."""
    search = "search" in curve
    runs = sorted(curve["runs"], key=lambda r: r.get("tried") or 0) if search else curve["runs"]
    header = [f"load ({unit(curve)})", "req/s", "output tok/s", "TTFT p50 ms", "TTFT p95 ms", "TPOT p50 ms"]
    header += ["goodput req/s", "errors", "queue"]
    rows = [["tried", *header, "passed"] if search else header]
    for run in runs:
        s = run["summary"]

        def ms(metric: str, pct: str, s: dict[str, Any] = s) -> str:
            return f"{s[metric][pct] * 1000:.1f}" if s.get(metric) else "-"

        row = [f"{run['load']:g}", f"{s['rps']:.2f}", f"{s['output_tokens_per_s']:.1f}", ms("ttft", "p50")]
        row += [ms("ttft", "p95"), ms("tpot", "p50"), f"{s['goodput_rps']:.2f}", str(sum(s["errors"].values()))]
        row.append(queue_state(run))
        if search:
            row = [str(run.get("tried") or "-"), *row, {True: "yes", False: "no", None: "-"}[run.get("passed")]]
        rows.append(row)
    return rows
