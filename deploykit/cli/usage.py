"""`deploykit usage`: tokens and requests from the gateway's ledger, priced against managed APIs."""

from __future__ import annotations

import dataclasses
import datetime as dt

import typer
from rich.markup import escape
from rich.table import Table

from deploykit.cli.console import err, out, print_json
from deploykit.cli.options import JsonOpt
from deploykit.core.settings import Settings
from deploykit.models.prices import load_prices
from deploykit.serve.accounting.database import opened
from deploykit.serve.accounting.ledger import UsageRow
from deploykit.serve.accounting.usage import parse_since, usage_report


def usage(
    since: str = typer.Option("30d", help="How far back: 24h, 7d, 2w, or a date such as 2026-11-01 (UTC)."),
    by: str = typer.Option("model", help="Group by model, key, day or budget (with each budget's caps and spend)."),
    compare: str = typer.Option("", help="Comma-separated managed services to price the same traffic on."),
    hourly_cost: float | None = typer.Option(
        None, help="What one GPU-hour (machine-hour on CPU) of this deployment costs you, in USD."
    ),
    json_: JsonOpt = False,
) -> None:
    """Show what the gateway served, and what it would have cost on managed pay-as-you-go APIs.

    Prices come from the dated data shipped with deploykit ($DEPLOYKIT_HOME/prices.toml adds or
    overrides entries); the self-hosted side is the deployment's GPU-hours times --hourly-cost. The
    "priced" column is what the ledger recorded: spilled requests at the managed price, local ones at
    `serve --token-price` when it was set; spend budgets are held to the same figures.

    Examples:

      deploykit usage --since 7d --by key

      deploykit usage --by day --compare gpt-4o-mini,gpt-4o --hourly-cost 1.20

      deploykit usage --by budget --since 30d
    """
    settings = Settings()
    with opened(settings.database) as db:
        report = usage_report(
            db,
            load_prices(settings.home / "prices.toml"),
            by=by,
            since=parse_since(since),
            compare=[c.strip() for c in compare.split(",") if c.strip()],
            hourly_cost=hourly_cost,
        )
    for warning in report.warnings:
        err.print(f"[yellow]Warning:[/yellow] {escape(warning)}", highlight=False)
    if json_:
        print_json(dataclasses.asdict(report))
        return
    start = dt.datetime.fromtimestamp(report.since, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    table = Table(title=f"Usage since {start}")
    columns = (by, "requests", "errors", "prompt tokens", "completion tokens", "audio s", "priced", *report.managed)
    for column in columns:
        table.add_column(column, justify="left" if column == by else "right")
    for i, row in enumerate(report.rows):
        costs = [f"${c[i]:,.4f}" for c in report.managed.values()]
        table.add_row(escape(row.group), *_counts(row), f"${row.cost_usd:,.4f}", *costs)
    total = report.total
    managed_total = (f"${c:,.4f}" for c in report.managed_total.values())
    table.add_row("[bold]total[/bold]", *_counts(total), f"${total.cost_usd:,.4f}", *managed_total)
    out.print(table)
    if report.budgets:
        caps = Table(title="Budgets now (UTC windows)")
        for column in ("budget", "kind", "window", "cap", "spent", "held", "left", "resets"):
            caps.add_column(column, justify="right" if column in ("cap", "spent", "held", "left") else "left")
        for b in report.budgets:
            cap, spent, held = (float(b[k]) for k in ("cap_usd", "spent_usd", "held_usd"))  # type: ignore[arg-type]
            resets = dt.datetime.fromtimestamp(float(b["resets_at"]), dt.UTC).strftime("%Y-%m-%d %H:%M")  # type: ignore[arg-type]
            kind = "hard" if b["hard"] else "soft"
            money = (f"${v:,.4f}" for v in (cap, spent, held, cap - spent - held))
            caps.add_row(escape(str(b["budget"])), kind, f"{b['window']} {b['period']}", *money, resets)
        out.print(caps)
    if not report.hours:
        out.print("Self-hosted: no deployment recorded in this period.")
        return
    hours = ", ".join(f"{h:,.1f} {device} hours" for device, h in report.hours.items())
    line = f"Self-hosted: {hours}"
    if report.self_hosted_cost is not None:
        line += f" x ${report.hourly_cost:,.2f} = ${report.self_hosted_cost:,.2f}"
    out.print(line, highlight=False)


def _counts(row: UsageRow) -> list[str]:
    counts = [f"{getattr(row, f):,}" for f in ("requests", "errors", "prompt_tokens", "completion_tokens")]
    return [*counts, f"{row.audio_seconds:,.0f}"]
