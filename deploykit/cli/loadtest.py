"""`deploykit loadtest`: measure any OpenAI-compatible endpoint with locust."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer
from rich.table import Table

from deploykit.cli.options import JsonOpt
from deploykit.console import err, out, print_json
from deploykit.errors import UsageError


def loadtest(
    url: str = typer.Argument(
        ..., help="The endpoint: a deploykit gateway, vLLM, OpenAI, or an Azure OpenAI resource."
    ),
    model: str = typer.Option(None, help="Model name (default: the endpoint's first model)."),
    api: str = typer.Option("chat", help="chat or completions."),
    stream: bool = typer.Option(True, help="Stream the answers (TTFT and ITL need it)."),
    concurrency: int = typer.Option(None, "--concurrency", "-c", help="Closed loop: this many requests at a time."),
    rate: float = typer.Option(None, "--rate", "-r", help="Open loop: Poisson arrivals per second."),
    duration: float = typer.Option(30, help="Seconds to run."),
    requests: int = typer.Option(None, "--requests", help="Stop after this many requests."),
    warmup: float = typer.Option(0, help="Seconds at the start left out of the results."),
    cooldown: float = typer.Option(0, help="Seconds at the end left out of the results."),
    input_tokens: int = typer.Option(128, help="Prompt length, in tokens (about)."),
    output_tokens: int = typer.Option(64, help="Answer length, in tokens (held with ignore_eos on vLLM)."),
    slo: str = typer.Option("", help="SLOs for goodput, e.g. ttft_p95=1s,tpot_p95=50ms."),
    out_path: Path = typer.Option(Path("loadtest.json"), "--out", help="The JSON report (summary and records)."),
    csv_path: Path = typer.Option(None, "--csv", help="Also write the per-request records as CSV."),
    api_key: str = typer.Option(None, envvar="OPENAI_API_KEY", help="API key (default: OPENAI_API_KEY)."),
    azure_deployment: str = typer.Option(None, help="Azure OpenAI deployment name (sends the key as api-key)."),
    azure_api_version: str = typer.Option("2024-10-21", help="Azure OpenAI api-version."),
    vllm: bool = typer.Option(True, help="The server is vLLM: ask for ignore_eos and per-chunk usage."),
    json_: JsonOpt = False,
) -> None:
    """Load-test an endpoint and report TTFT, inter-token latency, throughput and goodput.

    Examples:

      deploykit loadtest http://127.0.0.1:8000 -c 8 --duration 60

      deploykit loadtest http://127.0.0.1:8000 --rate 2 --slo ttft_p95=1s,tpot_p95=50ms --csv run.csv

      deploykit loadtest https://api.openai.com --model gpt-4o-mini -c 4 --no-vllm
    """
    if api not in ("chat", "completions"):
        raise UsageError(f"--api must be chat or completions, not {api!r}.")
    if (concurrency is None) == (rate is None):
        raise UsageError("Give exactly one load shape.", "--concurrency N (closed loop) or --rate R (open loop).")
    from pydantic import ValidationError

    from deploykit.loadtests.config import LoadTestConfig
    from deploykit.loadtests.launch import run_in_own_process
    from deploykit.loadtests.request import discover_model

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
            concurrency=concurrency,
            rate=rate,
            duration_s=duration,
            max_requests=requests,
            warmup_s=warmup,
            cooldown_s=cooldown,
            slos=slo,
        )
    except ValidationError as e:
        raise UsageError(f"Bad load-test options: {e.errors()[0]['msg']}.") from e
    report = run_in_own_process(config, out_path, csv_path)
    if json_:
        print_json(report)
    else:
        _print(report)
        err.print(f"Report: {out_path}" + (f", {csv_path}" if csv_path else ""))
    for reason in report["invalid_reasons"]:  # type: ignore[attr-defined]
        err.print(f"[yellow]Invalid run:[/yellow] {reason}", highlight=False)


def _print(data: dict[str, object]) -> None:
    s: dict[str, object] = data["summary"]  # type: ignore[assignment]
    out.print(
        f"{s['requests']} requests ({s['ok']} ok) in {s['window_s']:.1f} s: {s['rps']:.2f} req/s, "
        f"{s['output_tokens_per_s']:.1f} output tok/s, goodput {s['goodput_rps']:.2f} req/s "
        f"({s['slo_attainment']:.0%} within SLOs)"
    )
    if s["errors"]:
        out.print(f"errors: {s['errors']}")
    table = Table()
    for column in ("metric", "p50", "p90", "p95", "p99", "mean"):
        table.add_column(column)
    for name in ("ttft", "ttft_from_schedule", "itl", "chunk_gap", "tpot", "e2e"):
        d = s[name]
        if isinstance(d, dict):
            table.add_row(name, *(f"{d[k] * 1000:.1f} ms" for k in ("p50", "p90", "p95", "p99", "mean")))
    out.print(table)
