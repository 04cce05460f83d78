"""`deploykit serve`'s runner with the fake engine as the engine process, for lifecycle tests.

    python -m tests.fakes.serve_fake PORT ENGINE_PORT [fake engine args...]
Exits as the CLI does: 0 after a signal, the error's exit code after a failure.
"""

from __future__ import annotations

import sys

from deploykit.cli.serve import ConsoleReporter
from deploykit.console import print_error
from deploykit.errors import DeploykitError
from deploykit.serve.plan import LaunchPlan
from deploykit.serve.runner import ServeOptions, run
from deploykit.settings import Settings


def main() -> None:
    port, engine_port = int(sys.argv[1]), int(sys.argv[2])
    argv = (sys.executable, "-m", "tests.fakes.engine", "--port", str(engine_port), *sys.argv[3:])
    plan = LaunchPlan("cpu", argv, {}, (), "fake-model", engine_port, 2048, 0)
    try:
        run(Settings(), plan, ServeOptions(port=port, drain_timeout_s=10, start_timeout_s=60), ConsoleReporter())
    except DeploykitError as e:
        print_error(e)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
