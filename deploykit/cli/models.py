"""`deploykit models`: the models this machine can serve."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from deploykit.cli.options import JsonOpt
from deploykit.console import err, human_bytes, out, print_json
from deploykit.models.importer import import_model
from deploykit.models.store import ModelStore
from deploykit.settings import Settings

app = typer.Typer(help="List, import and remove local models.", no_args_is_help=True)


def _store() -> ModelStore:
    return ModelStore(Settings().models_dir)


@app.command("import")
def import_(
    path: Path = typer.Argument(..., help="A .gguf file or a Hugging Face model directory."),
    alias: str = typer.Option(..., "--alias", help="The name to serve it under."),
    force: bool = typer.Option(False, "--force", help="Replace a model already stored under ALIAS."),
    json_: JsonOpt = False,
) -> None:
    """Import a model into the local store as a Hugging Face directory the engine can load.

    A GGUF file is converted once (dequantized to bfloat16 safetensors, tokenizer and chat template kept).
    Importing the same file under the same alias again does nothing.

    Examples:

      deploykit models import ./SmolLM2-135M-Instruct.Q4_1.gguf --alias smollm2-135m

      deploykit models import ~/models/my-finetune --alias my-finetune
    """
    with err.status(f"Importing {path.name}") as status:
        model, written = import_model(
            path, alias, _store(), force=force, progress=lambda m: status.update(f"Importing {path.name}: {m}")
        )
    if json_:
        print_json({**model.to_json(), "written": written})
    elif written:
        err.print(f"Imported [bold]{alias}[/bold] ({human_bytes(model.size_bytes)}) into {model.path}")
    else:
        err.print(f"[bold]{alias}[/bold] is already imported from this source; nothing to do.")


@app.command("list")
def list_(json_: JsonOpt = False) -> None:
    """List the models in the local store."""
    models = _store().models()
    if json_:
        print_json([m.to_json() for m in models])
        return
    if not models:
        err.print("No models yet. Add one with `deploykit models import PATH --alias NAME`.")
        return
    table = Table()
    for column in ("alias", "size", "format", "source", "added"):
        table.add_column(column)
    for m in models:
        table.add_row(m.alias, human_bytes(m.size_bytes), m.format, m.source, m.added_at)
    out.print(table)


@app.command("rm")
def rm(alias: str = typer.Argument(..., help="The model to delete."), json_: JsonOpt = False) -> None:
    """Delete a model from the local store and say how much space that freed."""
    freed = _store().remove(alias)
    if json_:
        print_json({"alias": alias, "freed_bytes": freed})
    else:
        err.print(f"Removed {alias}; freed {human_bytes(freed)}.")
