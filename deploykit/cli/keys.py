"""`deploykit keys`: the API keys the gateway accepts."""

from __future__ import annotations

import datetime as dt
import time

import typer
from rich.markup import escape
from rich.table import Table

from deploykit.cli.console import err, out, print_json
from deploykit.cli.options import JsonOpt
from deploykit.core.errors import UsageError
from deploykit.core.settings import Settings
from deploykit.serve.accounting.database import opened
from deploykit.serve.accounting.keys import ApiKey, create_key, list_keys, revoke_key

app = typer.Typer(
    help="Create, list and revoke the gateway's API keys (stored hashed in the deploykit database).",
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
    expires: str | None = typer.Option(None, help="Expiry date (UTC), e.g. 2027-01-31 or 2027-01-31T12:00."),
    json_: JsonOpt = False,
) -> None:
    """Create an API key; its secret is printed once and never stored.

    Examples:

      deploykit keys create --name ci

      deploykit keys create --name team-a --models smollm2-135m --rpm 60 --tpm 100000 --expires 2027-01-31
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
    for column in ("name", "id", "models", "rpm", "tpm", "concurrent", "created", "expires", "status"):
        table.add_column(column)
    for k in keys:
        table.add_row(
            k.name,
            k.id,
            escape(", ".join(k.models)) if k.models is not None else "all",
            *(str(v) if v else "-" for v in (k.rpm, k.tpm, k.max_concurrent)),
            _date(k.created_at),
            _date(k.expires_at) if k.expires_at else "never",
            _status(k, now),
        )
    out.print(table)


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
