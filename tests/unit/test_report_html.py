"""The load test's HTML pages: what was tested, the summary as a table, charts with readable axes, no network."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest

from deploykit.loadtests.compare import compare
from deploykit.loadtests.curve import knee
from deploykit.loadtests.html import cdf, compare_page, curve_page, run_page, summary_table
from deploykit.loadtests.records import per_token_gaps
from tests.unit.test_cli import assert_clean_failure, deploykit

SVG = "{http://www.w3.org/2000/svg}"


def distribution(p50: float, p90: float, p95: float, p99: float, n: int = 10) -> dict[str, float]:
    return {"n": n, "mean": p50, "p50": p50, "p90": p90, "p95": p95, "p99": p99}


def summary(**changes: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "requests": 12,
        "ok": 10,
        "errors": {"429": 1, "cut": 1},
        "window_s": 6.034364818999165,
        "offered_rps": 2.0,
        "rps": 1.6667,
        "output_tokens_per_s": 106.6,
        "input_tokens_per_s": 213.3,
        "ttft": distribution(0.1204, 0.2, 0.25, 0.3),
        "ttft_from_schedule": distribution(0.13, 0.21, 0.26, 0.31),
        "itl": distribution(0.01, 0.012, 0.013, 0.02, 600),
        "chunk_gap": distribution(0.02, 0.024, 0.026, 0.04, 300),
        "tpot": distribution(0.011, 0.012, 0.0125, 0.013),
        "e2e": distribution(0.8, 0.9, 0.95, 1.0),
        "goodput_rps": 1.5,
        "slo_attainment": 0.75,
        "slos_met": {"ttft_p95": True},
        "usage_reported": True,
        "counted_by": {"server": 10},
        "ttft_answer": None,
    }
    return s | changes


def record(sent: float, gaps: list[tuple[float, int]], error: str | None = None) -> dict[str, Any]:
    events, t = [], sent + 0.1
    for gap, k in gaps:
        t += gap
        events.append((t, k))
    return {"sent": sent, "end": t + 0.01, "error": error, "events": events}


def report() -> dict[str, Any]:
    config = {"url": "http://gpu-1:8000/v1", "model": "smollm2-135m", "api": "chat", "stream": True}
    config |= {"concurrency": 4, "input_tokens": "128", "output_tokens": "64", "slos": "ttft_p95=250ms"}
    records = [record(i * 0.5, [(0.0, 1)] + [(0.02, 2)] * 5) for i in range(8)] + [record(1.0, [], "429")]
    return {"config": config, "summary": summary(), "records": records, "invalid_reasons": [], "server_metrics": []}


def cells(page: str) -> list[list[str]]:
    return [re.findall(r"<t[dh]>(.*?)</t[dh]>", row) for row in re.findall(r"<tr>(.*?)</tr>", page)]


def svgs(page: str) -> list[ElementTree.Element]:
    return [ElementTree.fromstring(s) for s in re.findall(r"<svg.*?</svg>", page, re.S)]


def texts(svg: ElementTree.Element) -> list[str]:
    return ["".join(t.itertext()).strip() for t in svg.iter(f"{SVG}text")]


def test_a_run_page_says_what_was_tested_and_tabulates_the_summary() -> None:
    page = run_page(report())
    rows = cells(page)
    assert ["endpoint", "http://gpu-1:8000/v1"] in rows and ["model", "smollm2-135m"] in rows
    assert ["load", "4 streams"] in rows and ["workload", "128 tokens in, 64 out"] in rows
    assert ["engine", "not reported by the server"] in rows
    assert ["hardware", "not given (loadtest run --hardware)"] in rows
    told = report()
    told["config"] |= {"engine_version": "0.32.0", "hardware": "l4"}
    told["finished_at"] = "2026-12-07T05:01:02+00:00"
    rows = cells(run_page(told, datetime(2027, 1, 1, tzinfo=UTC)))
    assert ["engine", "0.32.0"] in rows and ["hardware", "l4"] in rows
    assert ["run ended", "2026-12-07 05:01:02 UTC"] in rows and "written" not in str(rows)
    assert ["written", "2027-01-01 00:00 UTC"] in cells(run_page(report(), datetime(2027, 1, 1, tzinfo=UTC)))
    assert ["", "p50", "p90", "p95", "p99", "n"] in rows
    assert ["TTFT (ms)", "120.4", "200.0", "250.0", "300.0", "10"] in rows
    assert ["ITL (per token) (ms)", "10.0", "12.0", "13.0", "20.0", "600"] in rows
    assert ["end to end (ms)", "800.0", "900.0", "950.0", "1000.0", "10"] in rows
    assert ["requests", "12 (10 ok) over 6.0 s"] in rows
    assert ["goodput", "1.50 req/s (75.0% met every SLO)"] in rows
    assert ["errors by class", "429: 1, cut: 1"] in rows and ["SLOs", "ttft_p95 met"] in rows
    assert "{'requests'" not in page and "This run is not valid" not in page


def test_the_page_needs_no_network() -> None:
    page = run_page(report())
    assert "<script" not in page and "<link" not in page and "src=" not in page and "@import" not in page
    assert "href=" not in page.replace('xlink:href="#', "")  # only references inside the page


def test_every_chart_has_ticks_units_and_a_grid() -> None:
    charts = svgs(run_page(report()))
    assert len(charts) == 4
    for chart, (title, unit) in zip(
        charts,
        [
            ("TTFT", "ms"),
            ("Inter-token latency (per token)", "ms"),
            ("Requests in flight", "requests"),
            ("Output tokens per second", "tokens / s"),
        ],
        strict=True,
    ):
        words = texts(chart)
        assert title in words and unit in words
        ids = [g.get("id", "") for g in chart.iter(f"{SVG}g")]
        assert sum(i.startswith("xtick_") for i in ids) >= 3 and sum(i.startswith("ytick_") for i in ids) >= 3
        assert sum(i.startswith("line2d_") for i in ids) >= 6  # tick marks and their grid lines


def test_an_invalid_run_says_so_first() -> None:
    page = run_page(report() | {"invalid_reasons": ["the generator fell behind its schedule"]})
    assert page.index("This run is not valid") < page.index("<svg")
    assert "the generator fell behind its schedule" in page


def test_itl_counts_each_token_of_a_chunk() -> None:
    # a server that sends two tokens in a 20 ms chunk: two 10 ms inter-token gaps, not one of 20 ms
    gaps = per_token_gaps([(0.0, 1), (0.02, 2), (0.05, 3), (0.06, 1)])
    assert gaps == pytest.approx([0.01, 0.01, 0.01, 0.01, 0.01, 0.01])
    assert per_token_gaps([(0.0, 1), (0.02, 0)]) == []  # an event with no tokens adds no gap
    assert per_token_gaps([(0.0, 3)]) == []


def test_a_sweep_page_labels_every_level_and_tables_them() -> None:
    runs = [
        {"load": load, "summary": summary(rps=rps, output_tokens_per_s=tps, offered_rps=rps, goodput_rps=rps)}
        | {"config": report()["config"]}
        for load, rps, tps in ((1, 0.5, 32.0), (4, 1.8, 115.0), (16, 2.0, 128.0))
    ]
    page = curve_page({"sweep": "concurrency", "runs": runs})
    latency, by_load, goodput = svgs(page)
    assert ["load", "sweep: 1, 4, 16 streams"] in cells(page)
    assert {"Latency against load (streams)", "load (streams)", "SLO ttft p95"} <= set(texts(by_load))
    words = texts(latency)
    assert "Latency against throughput (points labelled by load, streams)" in words
    assert words.count("1") >= 3 and words.count("16") >= 3  # each of the three series labels its levels
    assert "SLO ttft p95" in words
    assert {"TTFT p50", "TTFT p95", "TPOT p50"} <= set(words)  # the legend
    assert "Goodput against offered load" in texts(goodput)
    rows = cells(page)
    header = ["load (streams)", "req/s", "output tok/s", "TTFT p50 ms", "TTFT p95 ms", "TPOT p50 ms"]
    assert rows[-4] == [*header, "goodput req/s", "errors", "queue"]
    assert [r[0] for r in rows[-3:]] == ["1", "4", "16"]
    assert rows[-2] == ["4", "1.80", "115.0", "120.4", "250.0", "11.0", "1.80", "2", "-"]


def test_a_search_page_says_which_levels_passed_in_the_order_tried_and_the_answer() -> None:
    tried = ((2, True, 1), (4, True, 2), (8, False, 3), (6, False, 4), (5, True, 5))
    runs = [{"load": load, "summary": summary(), "passed": passed, "tried": n} for load, passed, n in tried]
    runs.sort(key=lambda r: r["load"])  # as find_max writes them
    page = curve_page({"search": "rate", "best": 5.0, "limit_reached": False, "slos": "ttft_p95=250ms", "runs": runs})
    assert "Highest load that met every SLO: 5 req/s" in page
    rows = cells(page)
    assert rows[-6][:2] == ["tried", "load (req/s)"] and rows[-6][-1] == "passed"
    assert [(r[0], r[1], r[-1]) for r in rows[-5:]] == [
        ("1", "2", "yes"),
        ("2", "4", "yes"),
        ("3", "8", "no"),
        ("4", "6", "no"),
        ("5", "5", "yes"),
    ]
    assert ["load", "search from 2 req/s up"] in cells(page)
    latency, _, _ = svgs(page)
    labels = texts(latency)
    assert labels.index("2") < labels.index("4") < labels.index("5") < labels.index("6") < labels.index("8")


def test_the_knee_is_where_throughput_stops_growing_with_load() -> None:
    assert knee([(1, 10.0), (2, 19.0), (4, 34.0), (8, 36.0), (16, 36.5)]) == 2  # saturates at 4 streams
    assert knee([(1, 10.0), (2, 19.0), (4, 34.0), (8, 45.0)]) == 2  # 2x the load for 1.3x: bent at 4
    assert knee([(1, 10.0), (2, 20.0), (4, 40.0), (8, 80.0)]) is None  # still linear: no knee in range
    assert knee([(1, 10.0), (2, 19.0), (4, 34.0), (8, 55.0)]) is None  # bends by 0.1 only: still growing
    assert knee([(1, 10.0), (2, 30.0), (4, 30.0), (8, 20.0)]) == 1  # past saturation throughput falls
    assert knee([(1, 10.0), (2, 20.0)]) is None and knee([(1, 5.0), (2, 5.0), (4, 5.0)]) is None
    assert knee([(1, 10.0), (1, 20.0), (1, 30.0)]) is None


def test_a_sweep_page_marks_the_knee_and_says_where_it_is() -> None:
    levels = ((1, 32.0), (2, 61.0), (4, 109.0), (8, 115.0), (16, 117.0))
    runs = [
        {"load": load, "summary": summary(output_tokens_per_s=tps, offered_rps=tps / 60, rps=tps / 60)}
        for load, tps in levels
    ]
    page = curve_page({"sweep": "concurrency", "runs": runs})
    assert "Knee at 4 streams: past it, more load buys little more throughput." in page
    charts = svgs(page)
    assert len(charts) == 3 and all("knee: 4" in texts(chart) for chart in charts)
    flat = curve_page({"sweep": "concurrency", "runs": runs[:3]})
    assert "No knee in the levels tried" in flat and "knee:" not in flat


def test_every_point_and_bar_shows_its_values_on_hover() -> None:
    runs = [
        {"load": load, "summary": summary(output_tokens_per_s=tps, offered_rps=load / 2, rps=load / 2)}
        for load, tps in ((1, 32.0), (4, 115.0))
    ]
    latency, _, _ = svgs(curve_page({"sweep": "concurrency", "runs": runs}))
    hovers = ["".join(t.itertext()) for t in latency.iter(f"{SVG}title")]
    assert len(hovers) == 6  # two levels on each of three series
    assert "TTFT p95, 4: 115 output tokens / s, 250 ms" in hovers
    ttft = svgs(run_page(report()))[0]
    bars = ["".join(t.itertext()) for t in ttft.iter(f"{SVG}title")]
    assert len(bars) == 30 and sum(int(b.rsplit(": ", 1)[1]) for b in bars) == 8  # every answer in one bar
    assert bars[0].startswith("99.5 to ") and bars[0].endswith(" ms: 0")


def test_the_summary_table_skips_what_was_not_measured() -> None:
    rows = cells(summary_table(summary(itl=None, tpot=None, slos_met={}, errors={})))
    assert [r[0] for r in rows[:4]] == ["", "TTFT (ms)", "end to end (ms)", "requests"]
    assert ["errors by class", "none"] in rows and ["SLOs", "none set"] in rows


def test_a_comparison_page_overlays_the_two_runs_and_tables_the_differences() -> None:
    local = report()
    managed = report() | {"config": local["config"] | {"url": "https://api.openai.com/v1", "model": "gpt-4o-mini"}}
    managed["records"] = [record(i * 0.5, [(0.2, 1)] + [(0.04, 2)] * 5) for i in range(8)]
    managed["summary"] = summary(ttft=distribution(0.3, 0.4, 0.5, 0.6))
    page = compare_page(("local.json", "openai.json"), local, managed, compare(local, managed))
    rows = cells(page)
    assert rows[0] == ["", "local.json", "openai.json"]
    assert ["endpoint", "http://gpu-1:8000/v1", "https://api.openai.com/v1"] in rows
    assert ["model", "smollm2-135m", "gpt-4o-mini"] in rows
    assert ["metric", "local.json", "openai.json", "B / A"] in rows
    assert ["TTFT p50", "120.4 ms", "300.0 ms", "2.49"] in rows
    ttft, itl = svgs(page)
    assert {"TTFT: share at or below", "local.json", "openai.json"} <= set(texts(ttft))
    assert "Inter-token latency (per token): share at or below" in texts(itl)
    assert [point[1] for point in cdf([3.0, 1.0, 2.0, 2.0])] == [0.25, 0.5, 0.75, 1.0]
    assert [point[0] for point in cdf([3.0, 1.0, 2.0, 2.0])] == [1.0, 2.0, 2.0, 3.0]
    assert len(cdf([float(i) for i in range(1000)])) <= 201 and cdf([float(i) for i in range(1000)])[-1] == (
        999.0,
        1.0,
    )


def test_the_page_is_rebuilt_from_the_json_and_a_wrong_file_is_refused(tmp_path: Path) -> None:
    source, out = tmp_path / "run.json", tmp_path / "run.html"
    source.write_text(json.dumps(report()))
    result = deploykit(tmp_path, "report", str(source), "--html", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_text() == run_page(report(), datetime.fromtimestamp(source.stat().st_mtime, UTC))
    curve = tmp_path / "sweep.json"
    curve.write_text(json.dumps({"sweep": "rate", "runs": [{"load": 2, "summary": summary()}]}))
    assert deploykit(tmp_path, "report", str(curve), "--html", str(out)).returncode == 0
    assert out.read_text() == curve_page(
        json.loads(curve.read_text()), datetime.fromtimestamp(curve.stat().st_mtime, UTC)
    )
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1]")
    for bad, needle in (
        (tmp_path / "bad.json", "Cannot read the report"),
        (tmp_path / "missing.json", "Cannot read"),
        (tmp_path / "list.json", "its JSON is not an object"),
    ):
        assert_clean_failure(deploykit(tmp_path, "report", str(bad), "--html", str(out)), 2, needle, "cost --json")
    (tmp_path / "other.json").write_text('{"model": "x"}')
    refused = deploykit(tmp_path, "report", str(tmp_path / "other.json"), "--html", str(out))
    assert_clean_failure(refused, 2, "is not a report deploykit writes", "--out")
    unwritable = deploykit(tmp_path, "report", str(source), "--html", str(tmp_path))  # a folder
    assert_clean_failure(unwritable, 2, f"Cannot write {tmp_path}", "writable path for --html")
