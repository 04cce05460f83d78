"""`deploykit usage`: what the ledger recorded, and what the same traffic would have cost on managed APIs."""

from __future__ import annotations

import datetime as dt
import re
import time
from dataclasses import dataclass, field

from deploykit.core.errors import UsageError
from deploykit.models.prices import Prices, stale_warnings
from deploykit.serve.accounting.budgets import WindowState, budget_states
from deploykit.serve.accounting.database import Database
from deploykit.serve.accounting.ledger import UsageRow, deployment_hours, usage_by

_SPAN = re.compile(r"^(\d+(?:\.\d+)?)([mhdw])$")
_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class UsageReport:
    since: float
    by: str
    rows: list[UsageRow]
    total: UsageRow
    # managed service -> cost of each row's traffic there, then of the total
    managed: dict[str, list[float]] = field(default_factory=dict)
    managed_total: dict[str, float] = field(default_factory=dict)
    hours: dict[str, float] = field(default_factory=dict)  # device -> GPU-hours (machine-hours on CPU)
    hourly_cost: float | None = None
    self_hosted_cost: float | None = None
    warnings: list[str] = field(default_factory=list)
    budgets: list[dict[str, object]] = field(default_factory=list)  # with --by budget: each window's cap and spend


def parse_since(value: str, now: float | None = None) -> float:
    """'24h', '7d', '30m', '2w' ago, or an ISO date/time (UTC) -> unix seconds."""
    now = time.time() if now is None else now
    if match := _SPAN.match(value.strip()):
        return now - float(match.group(1)) * _SECONDS[match.group(2)]
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError as e:
        raise UsageError(f"--since '{value}' is neither a span nor a date.", "Use e.g. 24h, 7d or 2026-11-01.") from e
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def usage_report(
    db: Database,
    prices: Prices,
    *,
    by: str = "model",
    since: float = 0.0,
    compare: list[str] | None = None,
    hourly_cost: float | None = None,
    today: dt.date | None = None,
) -> UsageReport:
    if by not in ("model", "key", "day", "budget"):
        raise UsageError(
            f"--by '{by}' is not one of model, key, day, budget.", "Use --by model, --by key, --by day or --by budget."
        )
    compare = compare or []
    services = [prices.find(name) for name in compare]  # an unknown name fails before any work
    rows = usage_by(db, by, since)
    total = UsageRow(
        "total",
        sum(r.requests for r in rows),
        sum(r.errors for r in rows),
        sum(r.prompt_tokens for r in rows),
        sum(r.completion_tokens for r in rows),
        sum(r.cost_usd for r in rows),
        sum(r.audio_seconds for r in rows),
    )
    hours = deployment_hours(db, since)
    warnings = stale_warnings(services, today or dt.date.today())
    return UsageReport(
        since=since,
        by=by,
        rows=rows,
        total=total,
        managed={s.name: [s.cost(r.prompt_tokens, r.completion_tokens) for r in rows] for s in services},
        managed_total={s.name: s.cost(total.prompt_tokens, total.completion_tokens) for s in services},
        hours=hours,
        hourly_cost=hourly_cost,
        self_hosted_cost=None if hourly_cost is None else hourly_cost * sum(hours.values()),
        warnings=warnings,
        budgets=[_window(s) for s in budget_states(db)] if by == "budget" else [],
    )


def _window(state: WindowState) -> dict[str, object]:
    return {
        "budget": state.budget.name,
        "hard": state.budget.hard,
        "window": state.window.kind,
        "period": state.window.period,
        "cap_usd": state.cap,
        "spent_usd": state.spent,
        "held_usd": state.held,
        "resets_at": state.window.resets_at,
    }
