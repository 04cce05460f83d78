"""`deploykit keys`: the API keys the gateway accepts."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time

import typer
from rich.markup import escape
from rich.table import Table

from deploykit.cli.console import err, out, print_json
from deploykit.cli.options import JsonOpt
from deploykit.core.errors import UsageError
from deploykit.core.settings import Settings
from deploykit.serve.accounting.budgets import keys_of, set_budget
from deploykit.serve.accounting.database import opened
from deploykit.serve.accounting.keys import ApiKey, create_key, list_keys, revoke_key

app = typer.Typer(
    help="Create, list and revoke the gateway's API keys (stored hashed in the deploykit database), and set "
    "their spend budgets.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command("create")
def create(
    name: str = typer.Option(..., "--name", help="A unique name: who or what uses the key."),
    models: str | None = typer.Option(None, help="Comma-separated models the key may use (default: all)."),
    rpm: int | None = typer.Option(None, help="Requests per minute."),
    tpm: int | None = typer.Option(None, help="Tokens per minute (prompt + max_tokens reserved, then settled)."),
    max_concurrent: int | None = typer.Option(None, help="Requests in flight at once."),
    audio_spm: int | None = typer.Option(
        None, help="Seconds of audio a minute for /v1/audio/transcriptions and /v1/audio/translations."
    ),
    expires: str | None = typer.Option(None, help="Expiry date (UTC), e.g. 2027-01-31 or 2027-01-31T12:00."),
    budget: str | None = typer.Option(None, help="A spend budget it shares (`deploykit keys budget` makes one)."),
    priority: str = typer.Option(
        "normal",
        help="Its tier: high, normal or batch. Under --max-concurrent-streams the gateway serves tiers in that "
        "order, keeps a quarter of the slots from batch, and sheds batch first (429); engines schedule by it.",
    ),
    json_: JsonOpt = False,
) -> None:
    """Create an API key; its secret is printed once and never stored.

    Examples:

      deploykit keys create --name ci

      deploykit keys create --name team-a --models smollm2-135m --rpm 60 --tpm 100000 --expires 2027-01-31

      deploykit keys create --name nightly-evals --priority batch
    """
    with opened(Settings().database) as db:
        key, token = create_key(
            db,
            name,
            models=None if models is None else [m.strip() for m in models.split(",") if m.strip()],
            rpm=rpm,
            tpm=tpm,
            max_concurrent=max_concurrent,
            expires_at=_parse_expiry(expires) if expires else None,
            budget=budget,
            priority=priority,
            audio_spm=audio_spm,
        )
    if json_:
        print_json({**key.public(time.time()), "key": token})
        return
    out.print(token, highlight=False)
    err.print(f"Created key [bold]{escape(name)}[/bold]. Copy it now: it is not stored and cannot be shown again.")


@app.command("list")
def list_(json_: JsonOpt = False) -> None:
    """List the keys (never their secrets), with their limits and status."""
    with opened(Settings().database) as db:
        keys = list_keys(db)
    now = time.time()
    if json_:
        print_json([k.public(now) for k in keys])
        return
    if not keys:
        err.print("No API keys yet. Create one: deploykit keys create --name NAME")
        return
    table = Table()
    columns = ("name", "id", "models", "rpm", "tpm", "concurrent", "budget", "priority", "created", "expires", "status")
    for column in columns:
        table.add_column(column)
    for k in keys:
        table.add_row(
            k.name,
            k.id,
            escape(", ".join(k.models)) if k.models is not None else "all",
            *(str(v) if v else "-" for v in (k.rpm, k.tpm, k.max_concurrent)),
            escape(k.budget or "-"),
            k.priority,
            _date(k.created_at),
            _date(k.expires_at) if k.expires_at else "never",
            _status(k, now),
        )
    out.print(table)


@app.command("budget")
def budget(
    name: str = typer.Argument(..., help="The budget's name; a key's name makes it that key's own."),
    monthly: float | None = typer.Option(None, help="Cap in USD per UTC calendar month."),
    daily: float | None = typer.Option(None, help="Cap in USD per UTC day."),
    hard: bool | None = typer.Option(
        None, "--hard/--soft", help="Hard: refuse (429) what could pass a cap. Soft (new budgets): warn only."
    ),
    keys: str | None = typer.Option(None, help="Comma-separated keys (names or ids) that share this budget."),
    webhook: str | None = typer.Option(None, help="URL POSTed a JSON event the first time a window's cap is reached."),
    json_: JsonOpt = False,
) -> None:
    """Create or change a spend budget in dollars, for one key or a team of keys.

    Requests are priced as the ledger prices them (`serve --token-price` for local models, the managed
    price for spilled ones). Before each request the gateway holds its worst-case cost; under a hard
    budget, a request that could pass a cap gets a 429 saying what is left and when the window resets
    (midnight UTC, or the 1st of the month). Soft budgets answer with an x-deploykit-budget-warning header.
    Options left out keep their value; `deploykit usage --by budget` shows the spend.

    Examples:

      deploykit keys budget team-a --monthly 50 --hard

      deploykit keys budget research --daily 5 --monthly 100 --keys alice,bob --webhook https://hooks.example/x
    """
    with opened(Settings().database) as db:
        made = set_budget(
            db,
            name,
            daily_usd=daily,
            monthly_usd=monthly,
            hard=hard,
            webhook=webhook,
            keys=[k.strip() for k in keys.split(",") if k.strip()] if keys else (),
        )
        members = keys_of(db, name)
    if json_:
        print_json({**dataclasses.asdict(made), "keys": members})
        return
    caps = ", ".join(
        f"${cap:,.2f} {window}" for cap, window in ((made.daily_usd, "a day"), (made.monthly_usd, "a month")) if cap
    )
    kind = "hard" if made.hard else "soft"
    who = ", ".join(members) or "no key yet (attach with --keys, or keys create --budget)"
    err.print(f"Budget [bold]{escape(name)}[/bold]: {kind}, {caps} (UTC); keys: {escape(who)}.")


@app.command("revoke")
def revoke(name: str = typer.Argument(..., help="The key's name or id."), json_: JsonOpt = False) -> None:
    """Revoke a key: the gateway rejects it within seconds (401)."""
    with opened(Settings().database) as db:
        key = revoke_key(db, name)
    if json_:
        print_json(key.public(time.time()))
    else:
        err.print(f"Revoked [bold]{escape(key.name)}[/bold] ({key.id}).")


def _parse_expiry(value: str) -> float:
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError as e:
        raise UsageError(f"--expires '{value}' is not a date.", "Write it as 2027-01-31 or 2027-01-31T12:00.") from e
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).timestamp()


def _date(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d %H:%M")


def _status(key: ApiKey, now: float) -> str:
    status = key.status(now)
    return {"active": "[green]active[/green]", "revoked": "[red]revoked[/red]"}.get(
        status, f"[yellow]{status}[/yellow]"
    )
