"""The HTML report: self-contained SVG plots (no plotting library, no network) of a run or a sweep.

A run: TTFT and ITL distributions, and timelines of in-flight requests and output tokens per second
(each on its own axis: their scales differ by orders of magnitude).
A sweep or a find-max search: latency against throughput across the load levels, with the SLO lines.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path

from deploykit.core.slo import parse_slos

_W, _H, _PAD = 640, 300, 48
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")

Series = tuple[str, Sequence[tuple[float, float]]]


def line_chart(
    title: str, series: Sequence[Series], x_label: str, y_label: str, hlines: Sequence[tuple[str, float]] = ()
) -> str:
    """An SVG line chart with markers; `hlines` are labelled horizontal lines (SLO limits)."""
    points = [p for _, s in series for p in s]
    if not points:
        return f"<p>{html.escape(title)}: no data</p>"
    xs, ys = [x for x, _ in points], [y for _, y in points] + [v for _, v in hlines]
    x0, x1 = min(0.0, min(xs)), max(xs) or 1.0
    y1 = max(ys) * 1.1 or 1.0

    def sx(x: float) -> float:
        return _PAD + (x - x0) / ((x1 - x0) or 1) * (_W - 2 * _PAD)

    def sy(y: float) -> float:
        return _H - _PAD - y / y1 * (_H - 2 * _PAD)

    parts = [_frame(title, x_label, y_label, x0, x1, 0.0, y1)]
    for i, (name, s) in enumerate(series):
        colour = _COLOURS[i % len(_COLOURS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        parts.append(f'<polyline class="series" fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>' for x, y in s]
        parts.append(
            f'<text x="{_W - _PAD + 4}" y="{_PAD + 14 * i}" fill="{colour}" font-size="11">{html.escape(name)}</text>'
        )
    for name, value in hlines:
        y = sy(value)
        parts.append(
            f'<line class="slo" x1="{_PAD}" x2="{_W - _PAD}" y1="{y:.1f}" y2="{y:.1f}" '
            'stroke="#888" stroke-dasharray="4"/>'
        )
        parts.append(f'<text x="{_PAD + 4}" y="{y - 4:.1f}" font-size="10" fill="#555">{html.escape(name)}</text>')
    return _svg(parts)


def histogram(title: str, values: Sequence[float], x_label: str, bins: int = 30) -> str:
    if not values:
        return f"<p>{html.escape(title)}: no data</p>"
    lo, hi = min(values), max(values)
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    top = max(counts)
    parts = [_frame(title, x_label, "requests / tokens", lo, hi, 0, top)]
    bar = (_W - 2 * _PAD) / bins
    for i, c in enumerate(counts):
        h = c / top * (_H - 2 * _PAD)
        parts.append(
            f'<rect class="bar" x="{_PAD + i * bar:.1f}" y="{_H - _PAD - h:.1f}" width="{bar - 1:.1f}" '
            f'height="{h:.1f}" fill="{_COLOURS[0]}"/>'
        )
    return _svg(parts)


def run_page(report: dict[str, object]) -> str:
    """A single run: distributions and a per-second timeline."""
    records: list[dict] = report.get("records", [])  # type: ignore[assignment, type-arg]
    ok = [r for r in records if not r["error"]]
    ttft = [(r["events"][0][0] - r["sent"]) * 1000 for r in ok if r["events"]]
    itl = [
        (t - prev) / k * 1000
        for r in ok
        for (prev, _), (t, k) in zip(r["events"], r["events"][1:], strict=False)
        for _ in range(k)
    ]
    start = min((r["sent"] for r in records), default=0.0)
    end = max((r["end"] for r in records), default=0.0)
    seconds = range(math.ceil(end - start) + 1)
    in_flight = [(s, sum(1 for r in records if r["sent"] - start <= s < r["end"] - start)) for s in seconds]
    tokens = [(s, sum(k for r in ok for t, k in r["events"] if s <= t - start < s + 1)) for s in seconds]
    server: list[dict] = report.get("server_metrics") or []  # type: ignore[assignment, type-arg]
    body = [
        histogram("TTFT", ttft, "ms"),
        histogram("Inter-token latency (per token)", itl, "ms"),
        line_chart("Requests in flight", [("in flight", in_flight)], "s since start", "requests"),
        line_chart("Output tokens per second", [("tokens / s", tokens)], "s since start", "tokens / s"),
    ]
    if server:  # the server's own view, from its /metrics
        at = [(x["at"] - start) for x in server]
        queue = [("running", list(zip(at, (x["running"] for x in server), strict=True)))]
        queue.append(("waiting", list(zip(at, (x["waiting"] for x in server), strict=True))))
        body.append(line_chart("Server: requests running and waiting", queue, "s since start", "requests"))
        kv = [(t, x["kv_cache"] * 100) for t, x in zip(at, server, strict=True) if x["kv_cache"] is not None]
        preempted = [(t, x["preemptions"]) for t, x in zip(at, server, strict=True)]
        body.append(
            line_chart(
                "Server: KV-cache use and preemptions",
                [("KV cache %", kv), ("preemptions", preempted)],
                "s since start",
                "% / count",
            )
        )
    return _page("Load test", report, body)


def curve_page(curve: dict[str, object]) -> str:
    """A sweep or a find-max search: latency against throughput across the levels, with the SLO lines."""
    runs: list[dict] = curve["runs"]  # type: ignore[assignment, type-arg]
    series: list[Series] = []
    for label, metric, pct in (("TTFT p50", "ttft", "p50"), ("TTFT p95", "ttft", "p95"), ("TPOT p50", "tpot", "p50")):
        points = [
            (run["summary"]["output_tokens_per_s"], run["summary"][metric][pct] * 1000)
            for run in runs
            if run["summary"].get(metric)
        ]
        series.append((label, points))
    slo_text = curve.get("slos")
    if not slo_text and runs:
        slo_text = (runs[0].get("config") or {}).get("slos", "")
    slos = parse_slos(str(slo_text or ""))
    lines = [(f"SLO {s.metric}_p{s.pct}", s.limit * 1000) for s in slos]
    chart = line_chart("Latency against throughput", series, "output tokens / s", "ms", lines)
    return _page(f"Load test: {curve.get('sweep') or curve.get('search')} sweep", curve, [chart])


def write_html(path: Path, source: Path) -> None:
    """The page for a report or a curve JSON file written by `deploykit loadtest`."""
    data = json.loads(source.read_text())
    path.write_text(curve_page(data) if "runs" in data else run_page(data))


def _frame(title: str, x_label: str, y_label: str, x0: float, x1: float, y0: float, y1: float) -> str:
    return (
        f'<text x="{_W / 2}" y="18" text-anchor="middle" font-size="14">{html.escape(title)}</text>'
        f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" stroke="#000"/>'
        f'<line x1="{_PAD}" y1="{_PAD}" x2="{_PAD}" y2="{_H - _PAD}" stroke="#000"/>'
        f'<text x="{_W / 2}" y="{_H - 12}" text-anchor="middle" font-size="11">{html.escape(x_label)}</text>'
        f'<text x="14" y="{_H / 2}" font-size="11" transform="rotate(-90 14 {_H / 2})">{html.escape(y_label)}</text>'
        f'<text x="{_PAD}" y="{_H - _PAD + 14}" font-size="10">{x0:.3g}</text>'
        f'<text x="{_W - _PAD}" y="{_H - _PAD + 14}" font-size="10" text-anchor="end">{x1:.3g}</text>'
        f'<text x="{_PAD - 4}" y="{_PAD}" font-size="10" text-anchor="end">{y1:.3g}</text>'
        f'<text x="{_PAD - 4}" y="{_H - _PAD}" font-size="10" text-anchor="end">{y0:.3g}</text>'
    )


def _svg(parts: list[str]) -> str:
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W + 120}" height="{_H}">{"".join(parts)}</svg>'


def _page(title: str, data: dict[str, object], charts: list[str]) -> str:
    summary = data.get("summary")
    table = f"<pre>{html.escape(str(summary))}</pre>" if summary else ""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
        f"<body style='font-family:sans-serif'><h1>{html.escape(title)}</h1>{table}"
        + "".join(f"<div>{c}</div>" for c in charts)
        + "</body></html>"
    )
