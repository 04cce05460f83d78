"""The `deploykit` entry point: assembles the command groups and turns errors into messages and exit codes."""

from __future__ import annotations

import os
import sys

import typer

from deploykit import __version__
from deploykit.cli import chat, doctor, keys, loadtest, models, serve, size, usage
from deploykit.console import print_error
from deploykit.errors import DeploykitError

app = typer.Typer(
    name="deploykit",
    help="Serve open LLMs on your own hardware behind an OpenAI-compatible gateway, and measure them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("serve", context_settings={"allow_extra_args": True})(serve.serve)
app.command("doctor")(doctor.doctor)
app.command("chat")(chat.chat)
app.command("loadtest", context_settings={"allow_extra_args": True})(loadtest.loadtest)
app.command("pull")(models.pull_command)
app.command("usage")(usage.usage)
app.command("size")(size.size)
app.command("cost")(size.cost)
app.add_typer(models.app, name="models")
app.add_typer(keys.app, name="keys")


@app.callback(invoke_without_command=True)
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


def main() -> None:
    """Run the CLI; a DeploykitError becomes one message and its exit code (DEPLOYKIT_DEBUG=1: traceback).

    Usage errors are click's own (exit 2, with the usage line).
    """
    try:
        app(prog_name="deploykit")
    except DeploykitError as e:
        if os.environ.get("DEPLOYKIT_DEBUG"):
            raise
        print_error(e)
        sys.exit(e.exit_code)
