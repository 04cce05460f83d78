"""The HTML report of a run, a sweep or a find-max search: one offline page in one style.

Each page opens with what was tested (endpoint, model, workload, when), then a table of the summary
(p50/p90/p95/p99 of TTFT, ITL, TPOT and end-to-end latency, throughput, goodput, SLO attainment, errors by
class), then the charts.

The charts are drawn by matplotlib, already a dependency (the cost plot uses it), as inline SVG with its
text kept as text: the page needs no network and no JavaScript (on-prem and air-gapped users), its axes
have ticks, units and gridlines, and the text can be searched and tested. A run: TTFT and per-token ITL
distributions, requests in flight and output tokens per second over time, and the server's own view from
its /metrics. A sweep or search: latency percentiles against throughput with each point labelled by its
level and the SLO lines, goodput against offered load, and a table of every level.
"""

from __future__ import annotations

import html
import math
import zlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from matplotlib import rc_context
from matplotlib.figure import Figure

from deploykit.core.html import CHART_STYLE, page, paragraph, svg, table
from deploykit.core.slo import parse_slos
from deploykit.loadtests.curve import knee_load, knee_sentence, level_rows, queue_state, unit
from deploykit.loadtests.records import per_token_gaps

Series = tuple[str, Sequence[tuple[float, float]]]
_HOVER_POINTS = 250  # a series longer than this keeps plain markers: a hover target per point would bloat the page
_METRICS = (("TTFT", "ttft"), ("ITL (per token)", "itl"), ("TPOT", "tpot"), ("end to end", "e2e"))


def line_chart(
    title: str,
    series: Sequence[Series],
    x_label: str,
    y_label: str,
    hlines: Sequence[tuple[str, float]] = (),
    labels: Sequence[str] = (),
    vlines: Sequence[tuple[str, float]] = (),
) -> str:
    """An SVG line chart with markers; `hlines` are labelled horizontal lines (SLO limits), `vlines` labelled
    vertical ones (a knee), `labels` name the points of every series in order (a sweep's levels). Each point
    of a series short enough to read shows its values on hover."""
    if not any(points for _, points in series):
        return f"<p>{html.escape(title)}: no data</p>"
    hovers: dict[str, str] = {}
    with rc_context(CHART_STYLE):
        figure, axes = _figure(title, x_label, y_label)
        for name, points in series:
            xs, ys = [x for x, _ in points], [y for _, y in points]
            hover = len(points) <= _HOVER_POINTS
            (line,) = axes.plot(xs, ys, marker=None if hover else "o", label=name)
            for i, (x, y) in enumerate(points if hover else ()):
                gid = f"dk-{zlib.crc32(title.encode()):x}-{len(hovers)}"
                size = 6 if len(points) <= 40 else 3  # a distribution's many points stay a line
                axes.plot([x], [y], marker="o", markersize=size, linestyle="none", color=line.get_color(), gid=gid)
                level = f"{labels[i]}: " if i < len(labels) else ""
                hovers[gid] = f"{name}, {level}{x:.4g} {x_label}, {y:.4g} {y_label}"
            for label, x, y in zip(labels, xs, ys, strict=False):
                axes.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for name, value in hlines:
            axes.axhline(value, color="#555", linestyle="--", linewidth=1)
            where = {"xycoords": ("axes fraction", "data"), "textcoords": "offset points"}
            axes.annotate(name, (0, value), xytext=(4, -11), **where)  # under the line: points sit on it
        for name, value in vlines:
            axes.axvline(value, color="#b22", linestyle=":", linewidth=1.5)
            where = {"xycoords": ("data", "axes fraction"), "textcoords": "offset points"}
            axes.annotate(name, (value, 1), xytext=(4, -12), color="#b22", **where)
        axes.set_ylim(bottom=0)
        if len(series) > 1:
            axes.legend(loc="best")
        return svg(figure, hovers)


def histogram(title: str, values: Sequence[float], x_label: str, bins: int = 30) -> str:
    """A histogram; each bar shows its range and count on hover."""
    if not values:
        return f"<p>{html.escape(title)}: no data</p>"
    hovers: dict[str, str] = {}
    with rc_context(CHART_STYLE):
        figure, axes = _figure(title, x_label, "count")
        lo, hi = min(values), max(values)
        if hi - lo < 1e-6 * max(1.0, abs(hi)):  # all alike (to float precision): one bar, centred
            lo, hi = lo - 0.5, hi + 0.5
        counts, edges, bars = axes.hist(values, bins=bins, range=(lo, hi))
        for i, bar in enumerate(bars):
            gid = f"dk-{zlib.crc32(title.encode()):x}-{i}"
            bar.set_gid(gid)
            hovers[gid] = f"{edges[i]:.4g} to {edges[i + 1]:.4g} {x_label}: {counts[i]:.0f}"
        return svg(figure, hovers)


def run_page(report: dict[str, Any], written: datetime | None = None) -> str:
    """A single run: the summary, distributions and a per-second timeline."""
    records: list[dict[str, Any]] = report.get("records", [])
    ok = [r for r in records if not r["error"]]
    ttft, itl = _ttfts(report), _itls(report)
    start = min((r["sent"] for r in records), default=0.0)
    end = max((r["end"] for r in records), default=0.0)
    seconds = range(math.ceil(end - start) + 1)
    in_flight = [(s, sum(1 for r in records if r["sent"] - start <= s < r["end"] - start)) for s in seconds]
    tokens = [(s, sum(k for r in ok for t, k in r["events"] if s <= t - start < s + 1)) for s in seconds]
    server: list[dict[str, Any]] = report.get("server_metrics") or []
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
    tables = [summary_table(report["summary"])] if report.get("summary") else []
    if report.get("saturation"):  # did the server keep up: the queue over the run
        kept = report["saturation"]
        rows = [["queue", f"{queue_state(report)}: {kept['why']}"]]
        rows += [["stopped early", report["stopped_early"]]] if report.get("stopped_early") else []
        tables.append(table(rows))
    tested = table(_header(report.get("config") or {}, report.get("finished_at"), written))
    return page("Load test", [tested, *tables, *_validity(report), *body])


def curve_page(curve: dict[str, Any], written: datetime | None = None) -> str:
    """A sweep or a find-max search: latency against throughput and against load across the levels, with the
    SLO lines and the knee; goodput against offered load; and a table of every level (a search's in the order
    tried)."""
    runs: list[dict[str, Any]] = sorted(curve["runs"], key=lambda r: r["load"])
    kind, what = curve.get("sweep") or curve.get("search"), "search" if "search" in curve else "sweep"
    labels = [f"{run['load']:g}" for run in runs]
    measured = [r for r in runs if r["summary"].get("ttft") and r["summary"].get("tpot")]  # a level all errors: none
    latencies = (("TTFT p50", "ttft", "p50"), ("TTFT p95", "ttft", "p95"), ("TPOT p50", "tpot", "p50"))

    def latency(x: str) -> list[Series]:
        """The latencies of the measured levels against their load or a figure of their summary."""
        return [
            (name, [(r[x] if x == "load" else r["summary"][x], r["summary"][m][p] * 1000) for r in measured])
            for name, m, p in latencies
        ]

    slo_text = curve.get("slos") or (runs[0].get("config") or {}).get("slos", "") if runs else ""
    lines = [(f"SLO {s.metric} p{s.pct}", s.limit * 1000) for s in parse_slos(str(slo_text or ""))]
    at = knee_load(curve)
    knee = next((r for r in runs if r["load"] == at), None)

    def mark(x: str) -> list[tuple[str, float]]:
        """The knee as a vertical line at its level's `x` (load, or a figure of its summary)."""
        if knee is None:
            return []
        return [(f"knee: {at:g}", knee[x] if x == "load" else knee["summary"][x])]

    throughput = f"Latency against throughput (points labelled by load, {unit(curve)})"
    by_level = [f"{r['load']:g}" for r in measured]
    goodput = [
        ("completed req/s", [(r["summary"]["offered_rps"], r["summary"]["rps"]) for r in runs]),
        ("goodput req/s", [(r["summary"]["offered_rps"], r["summary"]["goodput_rps"]) for r in runs]),
    ]
    charts = [
        line_chart(throughput, latency("output_tokens_per_s"), "output tokens / s", "ms", lines, by_level,
                   mark("output_tokens_per_s")),
        line_chart(f"Latency against load ({unit(curve)})", latency("load"), f"load ({unit(curve)})", "ms", lines,
                   vlines=mark("load")),
        line_chart("Goodput against offered load", goodput, "offered req/s", "req/s", labels=labels,
                   vlines=mark("offered_rps")),
    ]  # fmt: skip
    best = curve.get("best")
    facts = [paragraph(f"Highest load that met every SLO: {best:g} {unit(curve)}")] if best is not None else []
    facts.append(paragraph(knee_sentence(curve)))
    if curve.get("skipped"):
        skipped = ", ".join(f"{x:g}" for x in curve["skipped"])
        facts.append(paragraph(f"Not run: {skipped} {unit(curve)}, past a level whose queue grew."))
    config = runs[0].get("config") or {} if runs else {}
    finished = max((r.get("finished_at") or "" for r in runs), default="")
    first = labels[0] if labels else "-"
    levels = f"sweep: {', '.join(labels)} {unit(curve)}" if what == "sweep" else f"search from {first} {unit(curve)} up"
    tested = table(_header(config, finished, written, levels))
    return page(f"Load test: {kind} {what}", [tested, *facts, table(level_rows(curve), header=True), *charts])


def compare_page(names: tuple[str, str], a: dict[str, Any], b: dict[str, Any], rows: Sequence[Any]) -> str:
    """Two runs (e.g. self-hosted and a managed API): what each tested, every figure side by side with
    B / A, and their TTFT and per-token ITL distributions overlaid (as CDFs: two histograms hide each other)."""
    tested = [["", *names]] + [
        [field, x, y]
        for (field, x), (_, y) in zip(
            _header(a.get("config") or {}, a.get("finished_at"), None),
            _header(b.get("config") or {}, b.get("finished_at"), None),
            strict=True,
        )
    ]
    differences = [["metric", *names, "B / A"]] + [r.cells() for r in rows]
    charts = []
    for title, values in (("TTFT", _ttfts), ("Inter-token latency (per token)", _itls)):
        series = [(name, cdf(values(report))) for name, report in zip(names, (a, b), strict=True)]
        charts.append(line_chart(f"{title}: share at or below", series, "ms", "fraction"))
    tables = [table(tested, header=True), table(differences, header=True)]
    return page("Load test: two runs compared", [*tables, *charts])


def summary_table(summary: dict[str, Any]) -> str:
    """The percentiles of each latency in ms, then throughput, goodput, SLOs and errors."""
    rows = [["", "p50", "p90", "p95", "p99", "n"]]
    for name, key in _METRICS:
        d = summary.get(key)
        if d:
            rows.append([f"{name} (ms)", *(f"{d[p] * 1000:.1f}" for p in ("p50", "p90", "p95", "p99")), str(d["n"])])
    percentiles = table(rows, header=True)
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(summary["errors"].items())) or "none"
    met = ", ".join(f"{k} {'met' if v else 'missed'}" for k, v in summary.get("slos_met", {}).items()) or "none set"
    facts = [
        ["requests", f"{summary['requests']} ({summary['ok']} ok) over {summary['window_s']:.1f} s"],
        ["throughput", f"{summary['rps']:.2f} req/s, {summary['output_tokens_per_s']:.1f} output tokens/s"],
        ["goodput", f"{summary['goodput_rps']:.2f} req/s ({summary['slo_attainment']:.1%} met every SLO)"],
        ["SLOs", met],
        ["errors by class", errors],
        ["tokens counted by", ", ".join(f"{k}: {v}" for k, v in summary.get("counted_by", {}).items()) or "-"],
    ]
    return percentiles + table(facts)


def report_page(data: dict[str, Any], written: datetime | None = None) -> str | None:
    """The page of a load-test report or curve (its JSON), or None for JSON that is neither."""
    if "runs" in data:
        return curve_page(data, written)
    return run_page(data, written) if "summary" in data else None


def _ttfts(report: dict[str, Any]) -> list[float]:
    return [(r["events"][0][0] - r["sent"]) * 1000 for r in report.get("records", []) if not r["error"] and r["events"]]


def _itls(report: dict[str, Any]) -> list[float]:
    return [gap * 1000 for r in report.get("records", []) if not r["error"] for gap in per_token_gaps(r["events"])]


def cdf(values: Sequence[float]) -> list[tuple[float, float]]:
    ordered = sorted(values)
    step = max(1, len(ordered) // 200)  # at most about 200 points a curve
    return [(v, (i + 1) / len(ordered)) for i, v in enumerate(ordered) if i % step == 0 or i == len(ordered) - 1]


def _validity(report: dict[str, Any]) -> list[str]:
    reasons = report.get("invalid_reasons") or []
    if not reasons:
        return []
    return ["<p><b>This run is not valid:</b> " + html.escape("; ".join(reasons)) + "</p>"]


def _header(
    config: dict[str, Any], finished: str | None, written: datetime | None, levels: str | None = None
) -> list[list[str]]:
    """What was tested: the endpoint, its model, engine and hardware, the API, the load (`levels`: a curve's)
    and the workload, and when (`finished`: the run's end, ISO 8601; `written`: the report file's time, for a
    page rebuilt later)."""
    load = levels or (
        f"{config['concurrency']} stream{'s' if config['concurrency'] != 1 else ''}"
        if config.get("concurrency")
        else f"trace {config['trace']}"
        if config.get("trace")
        else f"{config['rate']} req/s"
        if config.get("rate")
        else "-"
    )
    workload = (
        f"prompts {config['prompts']}"
        if config.get("prompts")
        else f"{config.get('input_tokens', '-')} tokens in, {config.get('output_tokens', '-')} out"
    )
    rows = [
        ["endpoint", str(config.get("url", "-"))],
        ["model", str(config.get("model", "-"))],
        ["engine", str(config.get("engine_version") or "not reported by the server")],
        ["hardware", str(config.get("hardware") or "not given (loadtest run --hardware)")],
        ["API", f"{config.get('api', '-')}, {'streamed' if config.get('stream', True) else 'not streamed'}"],
        ["load", load],
        ["workload", workload],
    ]
    if finished:
        rows.append(["run ended", datetime.fromisoformat(finished).strftime("%Y-%m-%d %H:%M:%S UTC")])
    elif written is not None:  # a report from before runs kept their time: the file's
        rows.append(["written", written.strftime("%Y-%m-%d %H:%M UTC")])
    return rows


def _figure(title: str, x_label: str, y_label: str) -> tuple[Figure, Any]:
    figure = Figure(figsize=(7.5, 3.4))
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    return figure, axes
