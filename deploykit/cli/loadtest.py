"""`deploykit loadtest run|worker|compare`: measure any OpenAI-compatible endpoint with locust, and put two runs side
by side (`deploykit report` rebuilds a page from a report's JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import typer
from rich.markup import escape
from rich.table import Table

from deploykit.cli.console import err, out, print_json
from deploykit.cli.options import JsonOpt
from deploykit.core.errors import DeploykitError, UsageError

if TYPE_CHECKING:
    from deploykit.loadtests.results import RunResult


app = typer.Typer(
    help="Load-test OpenAI-compatible endpoints and compare the runs.", no_args_is_help=True, add_completion=False
)


@app.command("run")
def run(
    url: str = typer.Argument(
        ..., help="The endpoint: a deploykit gateway, vLLM, OpenAI, or an Azure OpenAI resource."
    ),
    model: str = typer.Option(None, help="Model name (default: the endpoint's first model)."),
    api: str = typer.Option("chat", help="chat or completions."),
    stream: bool = typer.Option(True, help="Stream the answers (TTFT and ITL need it)."),
    concurrency: int = typer.Option(None, "--concurrency", "-c", help="Closed loop: this many requests at a time."),
    rate: float = typer.Option(None, "--rate", "-r", help="Open loop: arrivals per second (Poisson by default)."),
    burstiness: float = typer.Option(
        1.0, help="With --rate: the gamma shape of the gaps between arrivals; 1 is Poisson, below 1 burstier."
    ),
    trace: Path = typer.Option(
        None,
        help="Open loop: replay a trace's arrivals and lengths (JSONL {arrival, input_tokens, output_tokens}, the "
        "Azure LLM inference trace CSV, or BurstGPT's CSV).",
    ),
    trace_speed: float = typer.Option(1.0, help="Replay the trace this many times faster."),
    duration: float = typer.Option(30, help="Seconds to run."),
    requests: int = typer.Option(None, "--requests", help="Stop after this many requests."),
    warmup: float = typer.Option(0, help="Seconds at the start left out of the results."),
    cooldown: float = typer.Option(0, help="Seconds at the end left out of the results."),
    input_tokens: str = typer.Option("128", help="Prompt length in tokens (about): 128, or 64:256 drawn uniformly."),
    output_tokens: str = typer.Option("64", help="Answer length in tokens (held with ignore_eos on vLLM); or 32:128."),
    temperature: str = typer.Option(
        "0",
        help="Sampling temperature sent with every request: 0 (greedy, as vLLM's own benchmarks), another "
        "number, or `server` to send none (the server's default; some reasoning models accept only that).",
    ),
    shared_prefix: int = typer.Option(0, help="Tokens of a prefix every synthetic prompt shares."),
    turns: int = typer.Option(
        1, help="Chat conversations of this many turns, each sending the conversation so far (with -c)."
    ),
    prompts: str = typer.Option(None, help="Prompts from a JSONL file ({prompt, max_tokens} a line), or `bundled`."),
    slo: str = typer.Option("", help="SLOs for goodput, e.g. ttft_p95=1s,tpot_p95=50ms."),
    sweep: str = typer.Option(None, help="Run once per load level, e.g. 1,4,16 (concurrency, or rates with --rate)."),
    find_max: bool = typer.Option(
        False, "--find-max", help="Search for the highest load that meets every --slo, from -c or --rate up."
    ),
    out_path: Path = typer.Option(Path("loadtest.json"), "--out", help="The JSON report (summary and records)."),
    csv_path: Path = typer.Option(None, "--csv", help="Also write the per-request records as CSV."),
    html_path: Path = typer.Option(None, "--html", help="Also write an HTML report with plots."),
    api_key: str = typer.Option(None, envvar="OPENAI_API_KEY", help="API key (default: OPENAI_API_KEY)."),
    azure_deployment: str = typer.Option(None, help="Azure OpenAI deployment name (sends the key as api-key)."),
    azure_api_version: str = typer.Option("2024-10-21", help="Azure OpenAI api-version."),
    vllm: bool = typer.Option(True, help="The server is vLLM: ask for ignore_eos and per-chunk usage."),
    processes: int = typer.Option(
        1, help="Locust worker processes (under a master), for more load than one process can drive."
    ),
    master_port: int = typer.Option(
        None,
        help="Run the --processes workers elsewhere: wait for them to connect on this port (every interface), "
        "each started with `deploykit loadtest worker THIS_HOST:PORT` (other hosts, the pods of a Job).",
    ),
    tokenizer: str = typer.Option(
        None, help="A tokenizer.json (or its folder) to count tokens when the server reports no usage."
    ),
    hardware: str = typer.Option(
        None, help="What the server runs on, recorded for `deploykit size --from-loadtest`: cpu, l4, h100-sxm:2."
    ),
    json_: JsonOpt = False,
) -> None:
    """Load-test an endpoint and report TTFT, inter-token latency, throughput and goodput.

    Examples:

      deploykit loadtest run http://127.0.0.1:8000 -c 8 --duration 60

      deploykit loadtest run http://127.0.0.1:8000 --rate 2 --slo ttft_p95=1s,tpot_p95=50ms --csv run.csv

      deploykit loadtest run http://127.0.0.1:8000 -c 1 --sweep 1,4,16 --duration 20 --out sweep.json

      deploykit loadtest run http://127.0.0.1:8000 -c 1 --find-max --slo ttft_p95=1s --out search.json

      deploykit loadtest run https://api.openai.com --model gpt-4o-mini -c 4 --no-vllm

      deploykit loadtest run http://127.0.0.1:8000 --rate 4 --burstiness 0.5   # bursty arrivals

      deploykit loadtest run http://127.0.0.1:8000 --trace AzureLLMInferenceTrace_conv.csv --trace-speed 2
    """
    if api not in ("chat", "completions"):
        raise UsageError(f"--api must be chat or completions, not {api!r}.")
    if sum(x is not None for x in (concurrency, rate, trace)) != 1:
        raise UsageError(
            "Give exactly one load shape.", "--concurrency N (closed loop), --rate R or --trace FILE (open loop)."
        )
    if trace is not None and (sweep or find_max):
        raise UsageError("A trace sets its own load: it cannot be swept or searched.", "Use --trace-speed to scale it.")
    from pydantic import ValidationError

    from deploykit.loadtests.config import LoadTestConfig
    from deploykit.loadtests.launch import find_max as search_max
    from deploykit.loadtests.launch import run_in_own_process, run_sweep
    from deploykit.loadtests.request import discover_model, engine_version

    kind: Literal["chat", "completions"] = "chat" if api == "chat" else "completions"
    try:
        config = LoadTestConfig(
            url=url,
            model=model or discover_model(url, api_key),
            api=kind,
            stream=stream,
            api_key=api_key,
            azure_deployment=azure_deployment,
            azure_api_version=azure_api_version,
            vllm=vllm,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            temperature=None if temperature == "server" else temperature,
            shared_prefix_tokens=shared_prefix,
            turns=turns,
            processes=processes,
            master_port=master_port,
            tokenizer=tokenizer,
            prompts=prompts,
            concurrency=concurrency,
            rate=rate,
            burstiness=burstiness,
            trace=str(trace) if trace else None,
            trace_speed=trace_speed,
            duration_s=duration,
            max_requests=requests,
            warmup_s=warmup,
            cooldown_s=cooldown,
            slos=slo,
            hardware=hardware,
            engine_version=engine_version(url, api_key) if not azure_deployment else None,
        )
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise UsageError(f"Bad load-test options: {where + ': ' if where else ''}{first['msg']}.") from e
    config.workload()  # a bad prompt file fails here, with its line number, not in the load generator
    if trace:
        from deploykit.loadtests.traces import read_trace

        replay = read_trace(trace)  # likewise a bad trace
        skipped = f"; {replay.skipped} rows without tokens left out" if replay.skipped else ""
        err.print(
            f"Replaying {len(replay.arrivals)} requests over {replay.span_s / trace_speed:.0f} s{skipped} "
            f"(--duration {duration:g} s bounds the run).",
            highlight=False,
            markup=False,
        )
    if tokenizer:
        from deploykit.loadtests.request import load_token_counter

        load_token_counter(tokenizer)  # likewise a bad tokenizer
    if find_max:
        search = search_max(config, out_path, csv_path)
        _html(html_path, out_path)
        if json_:
            print_json(search.model_dump(mode="json"))
            return
        _print_curve(search.model_dump(mode="json"))
        if search.best is not None:
            err.print(f"Highest {search.search} meeting {slo}: {search.best:g}", highlight=False, markup=False)
        else:
            err.print(f"Even the lowest load tried misses {slo}.", highlight=False, markup=False)
        return
    if sweep:
        try:
            points = [float(p) for p in sweep.split(",")]
        except ValueError as e:
            raise UsageError(f"--sweep takes numbers separated by commas, not {sweep!r}.") from e
        curve = run_sweep(config, points, out_path, csv_path)
        _html(html_path, out_path)
        if json_:
            print_json(curve.model_dump(mode="json"))
            return
        _print_curve(curve.model_dump(mode="json"))
        err.print(f"Curve: {out_path}; each run's report beside it.", markup=False)
        return
    result = run_in_own_process(config, out_path, csv_path)
    _html(html_path, out_path)
    if json_:
        print_json(result.model_dump(mode="json"))
    else:
        _print(result)
        err.print(f"Report: {out_path}" + (f", {csv_path}" if csv_path else ""), markup=False)
    for reason in result.invalid_reasons:
        err.print(f"[yellow]Invalid run:[/yellow] {escape(reason)}", highlight=False)
    summary = result.summary
    if summary.requests and not summary.ok:  # a script must not mistake this run for a measurement
        raise DeploykitError(
            f"No request succeeded ({summary.errors}); the report is in {out_path}.",
            f"Is the server up at {config.url}, and does it serve {config.model}?",
        )


def _print(result: RunResult) -> None:
    s = result.summary
    out.print(
        f"{s.requests} requests ({s.ok} ok) in {s.window_s:.1f} s: {s.rps:.2f} req/s, "
        f"{s.output_tokens_per_s:.1f} output tok/s, goodput {s.goodput_rps:.2f} req/s "
        f"({s.slo_attainment:.0%} within SLOs)",
        markup=False,
    )
    if s.errors:
        out.print(f"errors: {s.errors}", markup=False)
    if result.server_metrics:
        m = result.server_metrics
        kv = [x["kv_cache"] for x in m if x["kv_cache"] is not None]
        out.print(
            f"server, at most: {max(x['running'] or 0 for x in m):.0f} running, "
            f"{max(x['waiting'] or 0 for x in m):.0f} waiting"
            + (f", KV cache {max(kv):.0%} full" if kv else "")
            + f"; {(m[-1]['preemptions'] or 0) - (m[0]['preemptions'] or 0):.0f} preemptions",
            markup=False,
        )
    elif result.server_notes:
        out.print(f"server metrics: none ({'; '.join(result.server_notes)})", markup=False)
    if result.saturation and result.saturation.get("saturated") is not None:
        out.print(f"queue: {result.saturation['why']}", markup=False, highlight=False)
    if result.stopped_early:
        out.print(f"stopped early, {result.stopped_early}", markup=False, highlight=False)
    if set(s.counted_by) != {"server"}:  # say how output tokens were counted when not event by event
        counts = ", ".join(f"{how}: {n}" for how, n in s.counted_by.items())
        out.print(f"output tokens counted by {counts} (requests)", markup=False)
    table = Table()
    for column in ("metric", "p50", "p90", "p95", "p99", "mean"):
        table.add_column(column)
    for name in ("ttft", "ttft_answer", "ttft_from_schedule", "itl", "chunk_gap", "tpot", "e2e"):
        d = getattr(s, name)
        if d is not None:
            table.add_row(name, *(f"{getattr(d, k) * 1000:.1f} ms" for k in ("p50", "p90", "p95", "p99", "mean")))
    out.print(table)


def _print_curve(curve: dict[str, Any]) -> None:
    """Every level (a search's in the order tried), then the knee."""
    from deploykit.loadtests.curve import knee_sentence, level_rows

    header, *rows = level_rows(curve)
    what = f"Search over {curve['search']}" if "search" in curve else f"Sweep over {curve['sweep']}"
    table = Table(title=what)
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    out.print(table)
    out.print(knee_sentence(curve), highlight=False, markup=False)
    if curve.get("skipped"):
        skipped = ", ".join(f"{x:g}" for x in curve["skipped"])
        out.print(f"Not run: {skipped}, past a level whose queue grew.", highlight=False, markup=False)


@app.command("worker")
def worker(
    master: str = typer.Argument(..., help="HOST:PORT of a `deploykit loadtest run ... --master-port PORT`."),
    api_key: str = typer.Option(None, envvar="OPENAI_API_KEY", help="API key (default: OPENAI_API_KEY)."),
) -> None:
    """One load-generator worker of a run on another host: it takes the run's config from the master (the API
    key from here) and sends its records back when the run ends.

    Examples:

      deploykit loadtest worker loadtest-master:5557
    """
    import os
    import subprocess
    import sys

    host, _, port = master.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"{master!r} is not HOST:PORT.", "For example: deploykit loadtest worker 10.0.0.5:5557")
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"} | (
        {"OPENAI_API_KEY": api_key} if api_key else {}
    )
    code = subprocess.run([sys.executable, "-m", "deploykit.loadtests", "--worker", host, port], env=env).returncode
    if code:
        raise DeploykitError(f"The load-generator worker exited with status {code}.", "Its output is above.")


@app.command("compare")
def compare(
    a: Path = typer.Argument(..., help="A report written by `deploykit loadtest run --out` (e.g. self-hosted)."),
    b: Path = typer.Argument(..., help="Another (e.g. a managed API at the same load)."),
    html_path: Path = typer.Option(
        None, "--html", help="Also write a page: both runs overlaid, the figures side by side."
    ),
    json_: JsonOpt = False,
) -> None:
    """Two load-test reports side by side, with B / A for every figure.

    Examples:

      deploykit loadtest compare local.json openai.json --html compare.html
    """
    from deploykit.loadtests.compare import compare as compare_reports
    from deploykit.loadtests.compare import load_report

    report_a, report_b = load_report(a), load_report(b)
    rows = compare_reports(report_a, report_b)
    if html_path is not None:
        from deploykit.core.html import write_page
        from deploykit.loadtests.html import compare_page

        write_page(html_path, compare_page((str(a), str(b)), report_a, report_b, rows))
        err.print(f"HTML report: {html_path}", markup=False)
    if json_:
        print_json([{"metric": r.metric, "a": r.a, "b": r.b, "unit": r.unit, "ratio": r.ratio} for r in rows])
        return
    table = Table()
    for column in ("metric", str(a), str(b), "B / A"):
        table.add_column(escape(column))
    for r in rows:
        table.add_row(*r.cells())
    out.print(table)


def _html(html_path: Path | None, source: Path) -> None:
    """The page of the report just written to `source`, if --html asked for one: `deploykit report` on it."""
    if html_path is not None:
        from deploykit.cli.report import report

        report(source, html_path)
