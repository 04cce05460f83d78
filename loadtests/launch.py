"""Start the load generator in a process of its own (see __main__) and read back its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from deploykit.errors import DeploykitError
from deploykit.loadtests.config import LoadTestConfig


class LoadTestError(DeploykitError):
    exit_code = 6


def run_in_own_process(config: LoadTestConfig, out: Path, csv: Path | None = None) -> dict[str, object]:
    """Run the load test; returns the report without its per-request records (they are in `out`)."""
    argv = [sys.executable, "-m", "deploykit.loadtests", config.model_dump_json(), str(out)]
    if csv is not None:
        argv.append(str(csv))
    out.unlink(missing_ok=True)
    result = subprocess.run(argv, stderr=None, check=False)
    if result.returncode != 0 or not out.exists():
        raise LoadTestError(f"The load generator failed (exit {result.returncode}).", "Its output is above.")
    report: dict[str, object] = json.loads(out.read_text())
    report.pop("records", None)
    return report
