"""`deploykit doctor`: print what was found and what is missing."""

from __future__ import annotations

from dataclasses import asdict

import typer
from rich.markup import escape

from deploykit.cli.console import human_bytes, out, print_json
from deploykit.cli.options import JsonOpt
from deploykit.core.settings import Settings
from deploykit.doctor import diagnose


def doctor(json_: JsonOpt = False) -> None:
    """Show the GPUs (or CPU cores and RAM), the installed engine, the local models, and what is missing.

    Exits 1 when something needed for `deploykit serve` is missing.
    """
    d = diagnose(Settings())
    if json_:
        print_json({**asdict(d), "ok": d.ok})
    else:
        hw = d.hardware
        if hw.gpus:
            for g in hw.gpus:
                out.print(
                    f"GPU {g.index}: {g.name}, {human_bytes(g.memory_bytes)} (compute {g.compute_capability})",
                    markup=False,
                )
        else:
            out.print("GPU: none found (nvidia-smi absent or silent); serving runs on the CPU")
        out.print(
            f"CPU: {hw.cpu_cores} cores; RAM {human_bytes(hw.ram_total_bytes)} "
            f"({human_bytes(hw.ram_available_bytes)} available)"
        )
        out.print(f"Engine: {d.engine or 'not installed'}; torch {d.torch or 'not installed'}", markup=False)
        out.print(f"Home: {d.home}; models: {', '.join(d.models) or 'none'}", markup=False)
        for p in d.problems:
            out.print(f"[red]Missing:[/red] {escape(p)}", highlight=False)
        if d.ok:
            out.print("[green]Ready to serve.[/green]")
    if not d.ok:
        raise typer.Exit(1)
