"""`deploykit size` and `deploykit cost`: which hardware serves a model at a load, and whether that beats
paying a managed API per token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from deploykit.cli.console import err, out, print_json
from deploykit.cli.options import JsonOpt
from deploykit.core.html import write_page
from deploykit.core.settings import Settings
from deploykit.models.catalog import load_catalog
from deploykit.models.config import ModelConfig
from deploykit.models.prices import Prices, load_prices
from deploykit.models.resolve import resolve
from deploykit.models.store import ModelStore
from deploykit.sizing import TargetLoad, cost_model, size_model
from deploykit.sizing.cost import (
    CostReport,
    Discounts,
    break_even_cells,
    cost_line_cells,
    managed_line_cells,
    plot_png,
    report_html,
)

ModelArg = typer.Argument(..., help="Model alias (catalog or local), e.g. llama-3.1-8b-instruct.")
RpsOpt = typer.Option(None, "--rps", help="Target load: requests per second (mean).")
TokensOpt = typer.Option(None, "--tokens-per-day", help="Target load: tokens (prompt + completion) per day.")
InputOpt = typer.Option(512, "--input-tokens", help="Prompt tokens per request.")
OutputOpt = typer.Option(256, "--output-tokens", help="Completion tokens per request.")
SloOpt = typer.Option("", "--slo", help="Latency objectives, e.g. ttft_p95=1s,tpot_p95=50ms.")
GpusOpt = typer.Option(
    "", "--gpus", help="Hardware to consider, comma-separated (default: every GPU in the data); `cpu` is this machine."
)
LoadtestOpt = typer.Option(None, "--from-loadtest", help="A `deploykit loadtest` JSON report to calibrate with.")
MeasuredOpt = typer.Option(
    None, "--measured-on", help="Hardware the load test ran on, if its report does not say: cpu, l4, h100-sxm:2."
)
ProviderOpt = typer.Option(None, "--provider", help="Price GPUs at this provider's rate (default: the cheapest).")
UtilOpt = typer.Option(0.8, "--max-utilization", help="Load each replica to at most this share of its SLO capacity.")


def _inputs(model: str) -> tuple[ModelConfig, Prices]:
    """The model's architecture numbers and the market data (the user's file over the shipped one)."""
    settings = Settings()
    config = resolve(model, ModelStore(settings.models_dir), load_catalog()).config()
    return config, load_prices(settings.home / "prices.toml")


def size(
    model: str = ModelArg,
    rps: float = RpsOpt,
    tokens_per_day: float = TokensOpt,
    input_tokens: int = InputOpt,
    output_tokens: int = OutputOpt,
    slo: str = SloOpt,
    gpus: str = GpusOpt,
    from_loadtest: Path = LoadtestOpt,
    measured_on: str = MeasuredOpt,
    provider: str = ProviderOpt,
    max_utilization: float = UtilOpt,
    json_: JsonOpt = False,
) -> None:
    """Rank the hardware that serves MODEL at a target load within the SLOs: GPU x count x tensor parallel x
    replicas, with predicted latency, throughput, cost and headroom.

    Predictions come from the GPUs' specs (a dated, sourced data file) and an analytic model (decode bound
    by memory bandwidth, prefill by compute, the KV cache by the fit check); a load test calibrates the
    hardware it ran on. Every number says whether it is estimated or calibrated, with its uncertainty.

    Examples:

      deploykit size llama-3.1-8b-instruct --rps 5 --input-tokens 512 --output-tokens 256

      deploykit size llama-3.1-70b-instruct --tokens-per-day 2e9 --slo ttft_p95=2s,tpot_p95=60ms

      deploykit size smollm2-135m --rps 1 --gpus cpu --from-loadtest run.json
    """
    config, prices = _inputs(model)
    sizing = size_model(
        model,
        config,
        TargetLoad.parse(rps, tokens_per_day, input_tokens, output_tokens, slo),
        prices,
        hardware=_names(gpus),
        from_loadtest=from_loadtest,
        measured_on=measured_on,
        provider=provider,
        max_utilization=max_utilization,
    )
    _warn(sizing.warnings)
    if json_:
        print_json(sizing.to_json())
        return
    w = sizing.load
    slos = ", ".join(f"{s.metric}_p{s.pct} <= {s.limit * 1000:g} ms" for s in w.slos) or "no SLO"
    table = Table(title=f"{model} at {w.rps:.3g} req/s ({w.input_tokens} in / {w.output_tokens} out; {slos})")
    columns = ("option", "rented as", "KV tok", "TTFT", "TPOT", "out tok/s", "headroom", "$/h", "$/month", "$/Mtok")
    for column in (*columns, "basis"):
        table.add_column(column, justify="left" if column in ("option", "rented as", "basis") else "right")
    for o in sizing.options:
        j = o.to_json(w)
        table.add_row(
            f"{o.replicas} x {o.hardware.name}" + (f" tp{o.tp}" if o.tp > 1 else ""),
            o.rental.label if o.rental else "-",
            f"{o.kv_cache_tokens / 1000:,.0f}k",
            _ms(o.at_load.ttft_s),
            _ms(o.at_load.tpot_s),
            f"{j['output_tokens_per_s']:,.0f}",
            f"{o.headroom(w.rps):+.0%}",
            _usd(o.usd_per_hour, 2),
            _usd(j["usd_per_month"], 0),  # type: ignore[arg-type]
            _usd(j["usd_per_mtok"], 3),  # type: ignore[arg-type]
            f"{'cal' if o.calibrated else 'est'} ±{o.band:.0%}",
        )
    out.print(table)
    if sizing.calibration:
        c = sizing.calibration
        out.print(
            f"Calibrated on {c.hardware} from {c.source}: measured TPOT {_ms(c.measured_tpot_s)} against "
            f"{_ms(c.predicted_tpot_s)} predicted at {c.concurrency} streams "
            f"({c.step_overhead_s * 1000:+.1f} ms a step), "
            f"prefill at {c.compute_eff:.0%} of peak compute.",
            highlight=False,
        )
    if sizing.infeasible:
        out.print(
            "Not feasible: " + "; ".join(f"{i.hardware} x tp{i.tp}: {i.reason}" for i in sizing.infeasible[:8]),
            highlight=False,
        )


def cost(
    model: str = ModelArg,
    rps: float = RpsOpt,
    tokens_per_day: float = TokensOpt,
    input_tokens: int = InputOpt,
    output_tokens: int = OutputOpt,
    compare: str = typer.Option(
        "",
        "--compare",
        help="Managed offers to price the same traffic on, e.g. gpt-4o-mini,llama-3.1-8b@together (default: the "
        "same model's managed offers and the general-purpose API nearest its size).",
    ),
    utilization: float = typer.Option(
        0.5, "--utilization", help="How busy the self-hosted GPUs are on average (the rest is headroom for peaks)."
    ),
    slo: str = SloOpt,
    gpus: str = GpusOpt,
    from_loadtest: Path = LoadtestOpt,
    measured_on: str = MeasuredOpt,
    provider: str = ProviderOpt,
    min_replicas: int = typer.Option(
        2, "--min-replicas", help="Replicas kept running whatever the load: 2 survives one failing; 1 allowed."
    ),
    ops_hours: float = typer.Option(
        None,
        "--ops-hours-per-month",
        help="A person's time self-hosting takes a month, at the \\[operations] rate of the price data "
        "(default: its 8 h, an assumption; 0 leaves it out).",
    ),
    cached_input_share: float = typer.Option(
        0.0,
        "--cached-input-share",
        help="Share of prompt tokens a managed offer serves from its prompt cache, at its cached-input price "
        "(offers whose price data has one: OpenAI's). Default 0: list prices.",
    ),
    batch_share: float = typer.Option(
        0.0,
        "--batch-share",
        help="Share of requests that can wait for a managed offer's batch API (answers within a day), at its "
        "batch discount (OpenAI's: 50%). Default 0.",
    ),
    plot: Path = typer.Option(None, "--plot", help="Write cost against monthly token volume as a PNG."),
    html_path: Path = typer.Option(None, "--html", help="Write an HTML report with the plot and the tables."),
    json_: JsonOpt = False,
) -> None:
    """Monthly cost of self-hosting MODEL (rented GPUs, or owned ones written off with power) against each
    managed offer at the same traffic, the break-even volume and the utilization it needs. Self-hosting
    counts, each as its own line: the GPUs the load needs, the replicas kept for availability
    (--min-replicas), a cloud bill's egress, storage and management on rented instances (the \\[rental_extras]
    share of the price data), owned cards' spares, servers, power and colocation (the \\[hosting] and \\[power]
    tables) and a person's time (--ops-hours-per-month). A managed bill takes off, each as its own line, what
    its prompt cache (--cached-input-share) and batch API (--batch-share) save.

    Examples:

      deploykit cost llama-3.1-8b-instruct --tokens-per-day 50e6 --compare llama-3.1-8b@together,gpt-4o-mini

      deploykit cost llama-3.1-70b-instruct --rps 2 --compare gpt-4o@azure-ptu,gpt-4o --plot cost.png --html cost.html
    """
    config, prices = _inputs(model)
    report, _ = cost_model(
        model,
        config,
        TargetLoad.parse(rps, tokens_per_day, input_tokens, output_tokens, slo),
        prices,
        [c.strip() for c in compare.split(",") if c.strip()],
        utilization,
        hardware=_names(gpus),
        from_loadtest=from_loadtest,
        measured_on=measured_on,
        provider=provider,
        min_replicas=min_replicas,
        ops_hours=ops_hours,
        discounts=Discounts(cached_input_share, batch_share),
    )
    _warn(report.warnings)
    data = report.to_json()  # what --json prints is what the chart and the page are drawn from
    if plot:
        plot.write_bytes(plot_png(data))
    if html_path:
        write_page(html_path, report_html(data))
    if json_:
        print_json(data)
        return
    _print_cost(report, data)


def _names(gpus: str) -> list[str] | None:
    return [g.strip() for g in gpus.split(",") if g.strip()] or None


def _print_cost(report: CostReport, data: dict[str, Any]) -> None:
    if report.basis:
        out.print(report.basis, highlight=False)
    title = f"Self-hosting {report.model}, per month at {report.utilization:.0%} utilization, every line included"
    hosted = Table(title=title)
    for column in ("option", "rented as", "rent", "own", "source"):
        hosted.add_column(column, justify="right" if column in ("rent", "own") else "left")
    for s in report.self_hosted[:8]:
        basis = "calibrated" if s.option.calibrated else "estimated"
        hosted.add_row(s.label, s.rented_as, _usd(s.rent_usd, 0), _usd(s.own_usd, 0), basis)
    out.print(hosted)
    lines = Table(title="The cheapest each way, line by line")
    for column in ("", "line", "per month"):
        lines.add_column(column, justify="right" if column == "per month" else "left")
    for row in cost_line_cells(data):
        lines.add_row(*row)
    out.print(lines)
    if report.managed:
        managed = Table(title="Managed, per month at the same traffic")
        for column in ("offer", "cost", "renting pays above (tokens/month)", "owning pays above"):
            managed.add_column(column, justify="left" if column == "offer" else "right")
        for m in data["managed"]:
            managed.add_row(m["name"], _usd(m["monthly_usd"], 0), *break_even_cells(m))
        out.print(managed)
        if discounted := managed_line_cells(data):
            bills = Table(title="Managed bills, line by line")
            for column in ("offer", "line", "per month"):
                bills.add_column(column, justify="right" if column == "per month" else "left")
            for row in discounted:
                bills.add_row(*row)
            out.print(bills)
    out.print(report.verdict, highlight=False)


def _warn(lines: list[str]) -> None:
    for line in lines:
        err.print(f"[yellow]Warning:[/yellow] {escape(line)}", highlight=False)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f}ms" if seconds < 10 else f"{seconds:,.1f}s"


def _usd(value: float | None, digits: int) -> str:
    return f"${value:,.{digits}f}" if value is not None else "-"
