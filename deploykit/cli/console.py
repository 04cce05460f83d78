"""Terminal output: data to stdout, messages and errors to stderr, sizes written for people."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.markup import escape

from deploykit.core.errors import DeploykitError

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def print_error(e: DeploykitError) -> None:
    for line in e.details:
        err.print(f"  [dim]{escape(line)}[/dim]", markup=True, highlight=False)
    err.print(f"[bold red]Error:[/bold red] {escape(e.message)}", highlight=False)
    if e.hint:
        err.print(f"[yellow]Hint:[/yellow] {escape(e.hint)}", highlight=False)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
