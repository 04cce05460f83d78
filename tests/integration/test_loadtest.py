"""`deploykit loadtest` (locust, in its own process as a user runs it) against the synthetic SSE server:
what it measures agrees with the server's known schedule, and every error is classified."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deploykit.core.ports import free_port
from deploykit.loadtests.metrics import percentile
from deploykit.loadtests.workload import load_prompts
from tests.fakes.hub import minilm_snapshot
from tests.fakes.sse_server import CHUNK_TOKENS, GAP_S, QUEUE_SLOTS, TTFT_S, chunk_plan

OUTPUT_TOKENS = 20


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    """The server in a process of its own, so that nothing else in the test process delays its replies."""
    server = subprocess.Popen([sys.executable, "-m", "tests.fakes.sse_server"], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    port = int(server.stdout.readline())
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait()


def cli(*args: str) -> str:
    """Run `deploykit loadtest ARGS` (ARGS starting with run or compare) as a user would; its standard output."""
    result = subprocess.run(
        [sys.executable, "-m", "deploykit", "loadtest", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def loadtest(tmp_path: Path, url: str, *args: str) -> dict:  # type: ignore[type-arg]
    out = tmp_path / "run.json"
    cli("run", url, "--out", str(out), "--csv", str(tmp_path / "run.csv"), "--output-tokens", str(OUTPUT_TOKENS), *args)
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def test_measures_the_known_schedule(tmp_path: Path, url: str) -> None:
    report = loadtest(
        tmp_path, url, "--model", "synth", "-c", "4", "--duration", "4", "--html", str(tmp_path / "r.html")
    )
    s = report["summary"]
    records = report["records"]
    assert s["ok"] == s["requests"] >= 20 and s["errors"] == {}
    assert abs(s["ttft"]["p50"] - TTFT_S) < 0.002  # the role-only chunk at 5 ms does not count
    assert abs(s["chunk_gap"]["p50"] - GAP_S) < 0.002
    plan = chunk_plan(OUTPUT_TOKENS)
    ideal_itl = sorted(g for k in plan[1:] for g in [GAP_S / k] * k)
    assert abs(s["itl"]["p50"] - percentile(ideal_itl, 50)) < 0.002
    ideal_tpot = (len(plan) - 1) * GAP_S / (OUTPUT_TOKENS - 1)
    assert abs(s["tpot"]["p50"] - ideal_tpot) < 0.002
    for r in records:  # token counts are exact, event by event, from the running usage
        assert r["output_tokens"] == OUTPUT_TOKENS and r["usage_reported"]
        assert [k for _, k in r["events"]] == plan
    assert s["usage_reported"] is True
    # Validity judges this machine's load generator (tests/unit/test_loadtest_metrics.py checks the rule);
    # here: the probe ran for the whole run and its verdict is the report's.
    assert report["schedule_lag"]["n"] >= 4 / 0.01 * 0.8
    assert report["valid"] == (report["invalid_reasons"] == [])
    assert (tmp_path / "run.csv").read_text().count("\n") == len(records) + 1
    page = (tmp_path / "r.html").read_text()
    assert page.count("<svg") == 4 and f"<td>{s['ttft']['p50'] * 1000:.1f}</td>" in page  # charts, summary table
    assert report["server_metrics"] == []  # the synthetic server exports no vLLM metrics, and the report says so
    assert report["server_notes"] == [f"{url}/metrics answered 200 without vLLM's metrics"]


def test_tokens_of_requests_cut_off_at_the_end_count_towards_the_rate(tmp_path: Path, url: str) -> None:
    """Answers of 120 tokens take 1.55 s, so a 3-second run cuts off the cohort it started last. The tokens
    those requests had received arrived in the window: a rate that left them out would be a third low (and
    nothing at all where every answer outlasts the run, as on a slow machine at high concurrency)."""
    out = tmp_path / "long.json"
    cli("run", url, "--model", "synth", "-c", "2", "--duration", "3", "--output-tokens", "120", "--out", str(out))
    s = json.loads(out.read_text())["summary"]
    per_stream = sum(CHUNK_TOKENS) / (len(CHUNK_TOKENS) * GAP_S)  # 80 tokens/s while an answer streams
    streaming = (len(chunk_plan(120)) - 1) * GAP_S / ((len(chunk_plan(120)) - 1) * GAP_S + TTFT_S)
    assert s["output_tokens_per_s"] == pytest.approx(2 * per_stream * streaming, rel=0.08)
    assert s["ok"] == s["requests"] <= 4  # the cut-off requests are not requests of the summary


def test_every_error_is_classified(tmp_path: Path, url: str) -> None:
    report = loadtest(tmp_path, url, "--model", "errors", "-c", "2", "--requests", "40", "--duration", "30")
    records = report["records"]
    errors = [r["error"] for r in records]
    n = len(records)
    assert n >= 40
    # the server numbers requests across the whole module; each error class appears once per ten
    assert errors.count("429") in (n // 10, n // 10 + 1)
    assert errors.count("5xx") in (n // 10, n // 10 + 1)
    assert errors.count("cut") in (n // 10, n // 10 + 1)
    assert all(r["retry_after"] == 2.0 for r in records if r["error"] == "429")
    assert {k: v for k, v in report["summary"]["errors"].items()} == {
        k: errors.count(k) for k in ("429", "5xx", "cut") if errors.count(k)
    }
    assert report["summary"]["slo_attainment"] == pytest.approx(errors.count(None) / n)


def test_open_loop_counts_latency_from_the_schedule(tmp_path: Path, url: str) -> None:
    report = loadtest(tmp_path, url, "--model", "synth", "--rate", "20", "--duration", "4", "--slo", "ttft_p95=80ms")
    s = report["summary"]
    assert 10 < s["offered_rps"] < 35  # Poisson at 20/s over a few seconds
    for r in report["records"]:
        assert r["sent"] >= r["scheduled"] - 0.001
    assert s["ttft_from_schedule"]["p50"] >= s["ttft"]["p50"]
    assert s["slos_met"] == {"ttft_p95": True}
    assert s["goodput_rps"] == pytest.approx(s["rps"], rel=0.2)


def test_sweep_writes_a_curve_and_one_report_per_level(tmp_path: Path, url: str) -> None:
    out = tmp_path / "sweep.json"
    printed = cli(
        "run",
        url,
        "--html",
        str(tmp_path / "sweep.html"),
        "--model",
        "synth",
        "-c",
        "1",
        "--sweep",
        "1,4",
        "--duration",
        "2",
        "--output-tokens",
        str(OUTPUT_TOKENS),
        "--out",
        str(out),
    )
    curve = json.loads(out.read_text())
    assert curve["sweep"] == "concurrency" and [r["load"] for r in curve["runs"]] == [1, 4]
    assert "No knee in the levels tried" in printed and "Sweep over concurrency" in printed
    one, four = (r["summary"] for r in curve["runs"])
    assert four["output_tokens_per_s"] > 2.5 * one["output_tokens_per_s"]  # the server has no queue
    for run in curve["runs"]:
        assert json.loads(Path(run["report"]).read_text())["records"]
    page = (tmp_path / "sweep.html").read_text()
    assert page.count("<svg") == 3 and "<th>load (streams)</th>" in page  # three charts and the levels' table
    for run in curve["runs"]:
        assert f"<td>{run['summary']['output_tokens_per_s']:.1f}</td>" in page

    compared = cli("compare", *(r["report"] for r in curve["runs"]), "--json", "--html", str(tmp_path / "c.html"))
    rows = {row["metric"]: row for row in json.loads(compared)}
    assert rows["output tokens/s"]["ratio"] == pytest.approx(four["output_tokens_per_s"] / one["output_tokens_per_s"])
    assert rows["TTFT p50"]["a"] == pytest.approx(one["ttft"]["p50"] * 1000)
    page = (tmp_path / "c.html").read_text()
    assert page.count("<svg") == 2 and f"<td>{rows['output tokens/s']['ratio']:.2f}</td>" in page


def test_find_max_finds_the_servers_capacity(tmp_path: Path, url: str) -> None:
    out = tmp_path / "max.json"
    # 4 slots, 20 tokens take ~0.3 s: past 4 streams requests queue and TTFT p95 passes 150 ms
    stdout = cli(
        "run",
        url,
        "--model",
        "queue",
        "-c",
        "1",
        "--find-max",
        "--slo",
        "ttft_p95=150ms",
        "--duration",
        "2.5",
        "--output-tokens",
        str(OUTPUT_TOKENS),
        "--out",
        str(out),
        "--json",
    )
    found = json.loads(stdout)
    assert found["best"] == QUEUE_SLOTS
    tried = [r["load"] for r in found["runs"]]
    assert tried == [1, 2, 4, 5, 6, 8]  # doubling to the first miss, then bisecting
    assert [r["passed"] for r in found["runs"]] == [True, True, True, False, False, False]
    assert [r["tried"] for r in found["runs"]] == [1, 2, 3, 6, 5, 4]  # 8 failed, then 6, then 5
    assert json.loads(out.read_text())["best"] == QUEUE_SLOTS


def test_find_max_over_rates_stops_at_the_servers_capacity(tmp_path: Path, url: str) -> None:
    """An open-loop search with an SLO loose enough that overload meets it for a while: the answer is the
    capacity (measured here: a closed loop keeping the 4 slots busy) within 10%, because levels whose queue
    grew fail, although they met the SLO; each of those stopped early."""
    capacity = loadtest(tmp_path, url, "--model", "queue", "-c", "8", "--duration", "5")["summary"]["rps"]
    out = tmp_path / "rates.json"
    search = ("--rate", "8", "--find-max", "--slo", "ttft_p95=30s", "--duration", "20")
    run = ("--output-tokens", str(OUTPUT_TOKENS), "--out", str(out), "--json")
    found = json.loads(cli("run", url, "--model", "queue", *search, *run))
    assert 0.9 * capacity <= found["best"] <= 1.1 * capacity, (found["best"], capacity)
    over = [r for r in found["runs"] if r["load"] > 1.1 * capacity]
    assert over and all(r["summary"]["slos_met"] == {"ttft_p95": True} for r in over)  # the SLO alone: passed
    assert all(r["saturation"]["saturated"] and not r["passed"] for r in over)
    assert all(r["stopped_early"].startswith("past saturation") for r in over)
    assert all(r["summary"]["window_s"] < 20 for r in over)
    calm = [r for r in found["runs"] if r["load"] < 0.9 * capacity]
    assert calm and all(r["saturation"]["saturated"] is False and r["passed"] for r in calm)


def test_bundled_prompts_set_each_answers_length(tmp_path: Path, url: str) -> None:
    report = loadtest(tmp_path, url, "--model", "synth", "-c", "2", "--duration", "3", "--prompts", "bundled")
    wanted = {p.max_tokens for p in load_prompts("bundled", 64)}
    lengths = {r["output_tokens"] for r in report["records"]}
    assert lengths <= wanted and len(lengths) > 1


def test_a_bad_prompt_file_is_a_usage_error(tmp_path: Path, url: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploykit",
            "loadtest",
            "run",
            url,
            "-c",
            "1",
            "--model",
            "synth",
            "--prompts",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "Line 1" in result.stderr and "Traceback" not in result.stderr


def test_a_run_where_nothing_succeeds_fails_loudly_and_keeps_its_report(tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = tmp_path / "run.json"
    result = subprocess.run(
        [sys.executable, "-m", "deploykit", "loadtest", "run", down, "--model", "m", "-c", "1", "--duration", "2",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1 and "No request succeeded" in result.stderr and "Traceback" not in result.stderr
    assert "connect" in json.loads(out.read_text())["summary"]["errors"]


def test_several_processes_merge_into_one_report(tmp_path: Path, url: str) -> None:
    report = loadtest(tmp_path, url, "--model", "synth", "-c", "4", "--processes", "2", "--duration", "3")
    records, s = report["records"], report["summary"]
    assert report["config"]["processes"] == 2
    assert len(records) >= 20 and s["errors"] == {}
    assert [r["scheduled"] for r in records] == sorted(r["scheduled"] for r in records)
    assert abs(s["ttft"]["p50"] - TTFT_S) < 0.003
    assert not list(tmp_path.glob("run.part*.json"))  # the per-process parts are merged and removed
    # an open loop: each process runs its share of the schedule and of --requests (not the whole of each)
    report = loadtest(tmp_path, url, "--model", "synth", "--rate", "40", "--processes", "2", "--requests", "30",
                      "--duration", "20")  # fmt: skip
    assert len(report["records"]) == 30 and report["summary"]["offered_rps"] < 60


def test_workers_on_other_hosts_connect_to_the_master(tmp_path: Path, url: str) -> None:
    """`loadtest run --master-port P --processes 2` waits for two `loadtest worker HOST:P` (here on this host,
    each in its own process as a pod would be): they take the run from the master and send their records
    back, moved onto the master's clock."""
    port = free_port()
    out = tmp_path / "remote.json"
    master = subprocess.Popen(
        [sys.executable, "-m", "deploykit", "loadtest", "run", url, "--model", "synth", "-c", "4", "--processes", "2",
         "--master-port", str(port), "--duration", "3", "--output-tokens", str(OUTPUT_TOKENS), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    worker = [sys.executable, "-m", "deploykit", "loadtest", "worker", f"127.0.0.1:{port}"]
    workers = [subprocess.Popen(worker, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    try:
        _, err = master.communicate(timeout=120)
        assert master.returncode == 0, err
        for w in workers:
            assert w.wait(30) == 0
    finally:
        for process in (master, *workers):
            if process.poll() is None:
                process.kill()
    report = json.loads(out.read_text())
    s = report["summary"]
    assert report["config"]["master_port"] == port and report["config"]["processes"] == 2
    assert s["ok"] == s["requests"] >= 20 and s["errors"] == {}
    assert abs(s["ttft"]["p50"] - TTFT_S) < 0.003  # the shifted records still time the known schedule
    assert all(r["sent"] >= report["started"] - 0.01 for r in report["records"])  # on the master's clock
    refused = subprocess.run([*worker[:-1], "nohost"], capture_output=True, text=True)
    assert refused.returncode == 2 and "is not HOST:PORT" in refused.stderr


def test_a_server_without_usage_is_counted_with_a_tokenizer_and_flagged(tmp_path: Path, url: str) -> None:
    tokenizer = minilm_snapshot()  # a WordPiece tokenizer: " x" is one token
    counted = loadtest(tmp_path, url, "--model", "nousage", "-c", "2", "--duration", "2", "--tokenizer", str(tokenizer))
    assert counted["records"] and counted["summary"]["usage_reported"] is False
    for r in counted["records"]:
        assert r["counted_by"] == "tokenizer" and r["output_tokens"] == OUTPUT_TOKENS
        assert [k for _, k in r["events"]] == chunk_plan(OUTPUT_TOKENS)
    guessed = loadtest(tmp_path, url, "--model", "nousage", "-c", "2", "--duration", "2")
    assert {r["counted_by"] for r in guessed["records"]} == {"events"}  # one per event: flagged, not exact
    assert all(r["output_tokens"] == len(chunk_plan(OUTPUT_TOKENS)) for r in guessed["records"])


def test_open_loop_latency_includes_the_wait_for_a_free_user(tmp_path: Path, url: str) -> None:
    """Coordinated omission: 20 arrivals a second, two users to carry them, a server that queues. Requests
    leave late; latency counted from the send would hide that wait, latency from the schedule does not."""
    from deploykit.loadtests.config import LoadTestConfig

    config = LoadTestConfig(
        url=url,
        model="queue",
        rate=20,
        max_in_flight=2,
        duration_s=4,
        output_tokens=OUTPUT_TOKENS,
        slos="ttft_p95=200ms",
    )
    out = tmp_path / "run.json"
    subprocess.run([sys.executable, "-m", "deploykit.loadtests", config.model_dump_json(), str(out)], check=True)
    report = json.loads(out.read_text())
    s = report["summary"]
    late = sorted(r["sent"] - r["scheduled"] for r in report["records"])
    assert late[len(late) // 2] > 0.3, "the schedule outran two users: requests must leave late"
    assert s["ttft"]["p50"] < 0.1  # from the send: the server answers fast once a request reaches it
    assert s["ttft_from_schedule"]["p50"] > s["ttft"]["p50"] + 0.3  # from the schedule: the wait counts
    assert s["slos_met"] == {"ttft_p95": False} and s["goodput_rps"] < s["rps"] / 2


def test_a_trace_is_replayed_as_recorded(tmp_path: Path, url: str) -> None:
    """`--trace`: each request sent at its arrival in the trace (sped up twice), asking for its lengths."""
    trace = tmp_path / "trace.jsonl"
    rows = [(0.0, 30, 8), (0.4, 60, 12), (0.5, 20, 4), (1.6, 90, 16)]
    trace.write_text("".join(f'{{"arrival": {a}, "input_tokens": {i}, "output_tokens": {o}}}\n' for a, i, o in rows))
    report = loadtest(tmp_path, url, "--model", "synth", "--trace", str(trace), "--trace-speed", "2", "--duration", "3")
    records = sorted(report["records"], key=lambda r: r["scheduled"])
    assert [r["error"] for r in records] == [None] * 4
    start = records[0]["scheduled"]
    assert [round(r["scheduled"] - start, 6) for r in records] == [0.0, 0.2, 0.25, 0.8]  # the trace's, halved
    assert [r["output_tokens"] for r in records] == [o for _, _, o in rows]  # each asked its own answer length
    assert all(r["sent"] - r["scheduled"] < 0.05 for r in records)  # sent on time


def test_the_server_s_own_metrics_are_scraped_during_the_run(tmp_path: Path) -> None:
    """Against an engine that exports vLLM's metrics: running requests over time in the report and the HTML
    timeline; against one that does not (the synthetic server), a note that says so."""
    port = free_port()
    engine = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.engine", "--port", str(port), "--model", "m1", "--token-delay", "0.02"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while not _answers(url + "/health"):
            assert time.monotonic() < deadline, "the engine did not start"
            time.sleep(0.1)
        html = tmp_path / "run.html"
        report = loadtest(tmp_path, url, "--model", "m1", "-c", "4", "--duration", "3", "--html", str(html))
    finally:
        engine.terminate()
        engine.wait()
    samples = report["server_metrics"]
    assert len(samples) >= 2 and report["server_notes"] == []
    assert max(s["running"] for s in samples) >= 1  # the engine's own count of the requests it ran
    assert all(report["started"] <= s["at"] <= report["ended"] + 1.5 for s in samples)
    assert "Server: requests running and waiting" in html.read_text()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_conversations_send_their_turns_so_far(tmp_path: Path, url: str) -> None:
    """`--turns 3`: each user's second and third requests carry the conversation so far, answers included,
    so the prompt grows turn by turn; then a new conversation starts."""
    report = loadtest(
        tmp_path, url, "--model", "conversation", "-c", "1", "--requests", "6", "--turns", "3",
        "--input-tokens", "10", "--duration", "10",
    )  # fmt: skip
    records = sorted(report["records"], key=lambda r: r["sent"])
    # a prompt of 10 words; each answer comes back as one word ("x" * 20); each turn adds an answer and 10 words
    assert [r["input_tokens"] for r in records] == [10, 21, 32, 10, 21, 32]
