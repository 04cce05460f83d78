"""Option and argument types shared by several commands."""

from __future__ import annotations

from typing import Annotated

import typer

DEFAULT_MODEL = "smollm2-135m"

ModelArg = Annotated[str, typer.Argument(help="Model alias from `deploykit models list`.", show_default=True)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
HostOpt = Annotated[str, typer.Option(help="Address the gateway listens on.", envvar="DEPLOYKIT_HOST")]
PortOpt = Annotated[int, typer.Option(help="Port the gateway listens on.", envvar="DEPLOYKIT_PORT")]
