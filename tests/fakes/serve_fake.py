"""`deploykit serve`'s runner with fake engine processes as the engines, for lifecycle tests.

    python -m tests.fakes.serve_fake PORT ENGINE_PORT[,ENGINE_PORT...] [fake engine args...]
One replica of "fake-model" per engine port. FAKE_DRAIN_S sets the drain timeout (default 10 s), FAKE_HOST
the gateway's address, FAKE_LEDGER_DELAY holds each ledger commit back that many seconds (a slow disk).
Restarts back off 0.2 s, 0.4 s, ... and a replica is given up after 2 failed restarts (so tests see it
quickly). Exits as the CLI does: 0 after a signal, the
error's exit code after a failure.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from deploykit.cli.console import print_error
from deploykit.cli.serve import ConsoleReporter
from deploykit.core.errors import DeploykitError
from deploykit.core.settings import Settings
from deploykit.serve.accounting.ledger import Ledger
from deploykit.serve.plan import LaunchPlan
from deploykit.serve.runner import ServeOptions, run
from deploykit.serve.supervisor import RestartPolicy


def main() -> None:
    port, engine_ports = int(sys.argv[1]), [int(p) for p in sys.argv[2].split(",")]
    plans = [
        LaunchPlan(
            "cpu",
            (sys.executable, "-m", "tests.fakes.engine", "--port", str(p), *sys.argv[3:]),
            {},
            (),
            "fake-model",
            p,
            2048,
            0,
        )
        for p in engine_ports
    ]
    options = ServeOptions(
        host=os.environ.get("FAKE_HOST", "127.0.0.1"),
        port=port,
        drain_timeout_s=float(os.environ.get("FAKE_DRAIN_S", "10")),
        start_timeout_s=60,
    )
    if delay := float(os.environ.get("FAKE_LEDGER_DELAY", "0")):
        commit = Ledger._commit

        def slow_commit(self: Ledger, batch: Sequence[Any]) -> None:
            time.sleep(delay)
            commit(self, batch)

        Ledger._commit = slow_commit  # type: ignore[method-assign]
    policy = RestartPolicy(backoff_s=0.2, max_failures=2, stable_s=30)
    try:
        run(Settings(), plans, options, ConsoleReporter(), policy)
    except DeploykitError as e:
        print_error(e)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
