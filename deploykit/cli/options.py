"""Option and argument types shared by several commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DEFAULT_MODEL = "smollm2-135m"

ModelArg = Annotated[str, typer.Argument(help="Model alias from `deploykit models list`.", show_default=True)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
HostOpt = Annotated[str, typer.Option(help="Address the gateway listens on.", envvar="DEPLOYKIT_HOST")]
PortOpt = Annotated[int, typer.Option(help="Port the gateway listens on.", envvar="DEPLOYKIT_PORT")]
LockFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--lock-file",
        envvar="DEPLOYKIT_LOCK",
        help="The lock file: each model's commit and sha256 of its files (default: $DEPLOYKIT_HOME/deploykit.lock).",
        show_default=False,
    ),
]
LockedOpt = Annotated[
    bool,
    typer.Option("--locked", help="Refuse a model that differs from the lock file: another commit, file or bytes."),
]
