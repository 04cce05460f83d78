"""The `deploykit` entry point: the command table, and errors turned into messages and exit codes.

Commands are imported only when one runs: `deploykit --help` lists them from the table below without
importing the engine, the gateway or the hub client (each of which takes a noticeable part of a second).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from deploykit import __version__
from deploykit.core.errors import DeploykitError

# name -> (module, attribute: a function or a Typer group, one-line help, click context settings)
COMMANDS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "serve": (
        "deploykit.cli.serve",
        "serve",
        "Serve models with vLLM behind one OpenAI-compatible gateway.",
        {"allow_extra_args": True},
    ),
    "chat": ("deploykit.cli.chat", "chat", "Chat with any OpenAI-compatible endpoint, streaming.", {}),
    "pull": ("deploykit.cli.models", "pull_command", "Download a model from the Hugging Face hub, verified.", {}),
    "serve-hub": (
        "deploykit.cli.models",
        "serve_hub",
        "Serve this machine's hub models to a fleet: a site mirror for HF_ENDPOINT.",
        {},
    ),
    "models": ("deploykit.cli.models", "app", "Find models in the catalog; list, import and remove local ones.", {}),
    "keys": ("deploykit.cli.keys", "app", "Create, list and revoke the gateway's API keys; spend budgets.", {}),
    "lora": ("deploykit.cli.lora", "app", "Register LoRA adapters the running gateway loads and serves.", {}),
    "usage": ("deploykit.cli.usage", "usage", "What the gateway served, priced against managed APIs.", {}),
    "loadtest": ("deploykit.cli.loadtest", "app", "Load-test OpenAI-compatible endpoints and compare runs.", {}),
    "size": ("deploykit.cli.size", "size", "Rank the hardware that serves a model at a load.", {}),
    "cost": ("deploykit.cli.size", "cost", "Self-hosting against managed offers: monthly cost, break-even.", {}),
    "report": ("deploykit.cli.report", "report", "Rebuild a load-test or cost page from its JSON.", {}),
    "deploy": ("deploykit.cli.deploy", "app", "Docker compose and Kubernetes projects from launch plans.", {}),
    "doctor": ("deploykit.cli.doctor", "doctor", "What this machine has for serving, and what is missing.", {}),
}


class LazyGroup(TyperGroup):
    """Imports a command's module when the command runs; the list in --help comes from COMMANDS."""

    _listing = False

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, name: str) -> Any:
        if name not in COMMANDS:
            return None
        module, attribute, short_help, settings = COMMANDS[name]
        if self._listing:
            return TyperCommand(name, help=short_help, short_help=short_help)
        target = getattr(importlib.import_module(module), attribute)
        if isinstance(target, typer.Typer):
            command = typer.main.get_command(target)
        else:
            single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
            single.command(name, context_settings=settings)(target)
            single.callback()(lambda: None)  # a group of one, so that the command keeps its own name
            command = typer.main.get_command(single).commands[name]  # type: ignore[attr-defined]
        command.name = name
        for each in [command, *getattr(command, "commands", {}).values()]:
            each.help = _reflow(each.help)
        return command

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


def _reflow(text: str | None) -> str | None:
    """Typer keeps a docstring's line breaks, so its long lines wrap raggedly on a narrow terminal: join the
    lines of each prose paragraph; an indented paragraph (the examples) stays as written."""
    if text is None:
        return None
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(p if p.startswith((" ", "\b")) else " ".join(p.split("\n")) for p in paragraphs)


app = typer.Typer(
    name="deploykit",
    cls=LazyGroup,
    help="Serve open LLMs on your own hardware behind an OpenAI-compatible gateway, and measure them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback(invoke_without_command=True)
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


def _debug() -> bool:
    from deploykit.core.settings import Settings

    try:
        return Settings().debug
    except ValueError:  # a malformed DEPLOYKIT_ variable: show the traceback that names it
        return True


def main() -> None:
    """Run the CLI; a DeploykitError becomes one message and its exit code (DEPLOYKIT_DEBUG=1: traceback).

    Usage errors are click's own (exit 2, with the usage line).
    """
    try:
        app(prog_name="deploykit")
    except DeploykitError as e:
        if _debug():
            raise
        from deploykit.cli.console import print_error

        print_error(e)
        sys.exit(e.exit_code)
