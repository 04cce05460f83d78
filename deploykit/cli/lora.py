"""`deploykit lora`: LoRA adapters registered at run time, which the gateway loads into its engines."""

from __future__ import annotations

import dataclasses
import datetime as dt

import typer
from rich.markup import escape
from rich.table import Table

from deploykit.cli.console import err, out, print_json
from deploykit.cli.options import JsonOpt
from deploykit.core.settings import Settings
from deploykit.serve.accounting.adapters import add_adapter, list_adapters, remove_adapter
from deploykit.serve.accounting.database import opened
from deploykit.serve.plan import read_adapter

app = typer.Typer(
    help="Register LoRA adapters while the gateway runs: it loads them into the engines of their model and "
    "serves each under its own name.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command("add")
def add(
    name: str = typer.Argument(..., help="The name clients ask for in `model` (and keys' --models name)."),
    path: str = typer.Argument(..., help="The adapter directory as peft saves it (adapter_config.json inside)."),
    model: str = typer.Option(..., "--model", help="The served model it adapts."),
    json_: JsonOpt = False,
) -> None:
    """Register an adapter: within seconds every running gateway loads it into MODEL's engines.

    The engines must have been started for it: `deploykit serve --lora-on-demand`, or any `serve` started
    after an adapter of that model was registered. The directory must be readable where the engines run.

    Examples:

      deploykit lora add support ./adapters/support --model smollm2-135m
    """
    adapter = read_adapter(f"{name}={path}")  # checks the directory and reads its rank
    with opened(Settings().database) as db:
        added = add_adapter(db, name, model, str(adapter.path), adapter.rank)
    if json_:
        print_json(dataclasses.asdict(added))
    else:
        err.print(f"Registered [bold]{escape(name)}[/bold] (rank {added.rank}) for {escape(model)}.")


@app.command("list")
def list_(json_: JsonOpt = False) -> None:
    """The registered adapters."""
    with opened(Settings().database) as db:
        adapters = list_adapters(db)
    if json_:
        print_json([dataclasses.asdict(a) for a in adapters])
        return
    if not adapters:
        err.print("No adapters registered. Add one: deploykit lora add NAME PATH --model MODEL")
        return
    table = Table()
    for column in ("name", "model", "rank", "path", "added"):
        table.add_column(column)
    for a in adapters:
        added = dt.datetime.fromtimestamp(a.created_at, dt.UTC).strftime("%Y-%m-%d %H:%M")
        table.add_row(escape(a.name), escape(a.model), str(a.rank), escape(a.path), added)
    out.print(table)


@app.command("remove")
def remove(name: str = typer.Argument(..., help="The adapter's name."), json_: JsonOpt = False) -> None:
    """Unregister an adapter: the gateways unload it from the engines within seconds."""
    with opened(Settings().database) as db:
        removed = remove_adapter(db, name)
    if json_:
        print_json(dataclasses.asdict(removed))
    else:
        err.print(f"Removed [bold]{escape(name)}[/bold].")
