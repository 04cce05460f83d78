"""The sizing model's honesty check on this machine (docs/SIZING.md): the KV cache it predicts for the CPU
engine is the one vLLM logs, and after calibrating from one `deploykit loadtest` run it predicts the
throughput at other concurrencies within 25%. Also `deploykit size --from-loadtest` end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.sizing_cpu import compare_levels, measure
from deploykit.models.catalog import load_catalog
from deploykit.sizing.calibration import installed_engine_version
from deploykit.sizing.hardware import kv_tokens_on, measure_cpu
from tests.e2e.conftest import MODEL, Served

pytestmark = pytest.mark.e2e


def test_kv_capacity_and_calibrated_throughput(served: Served, tmp_path: Path) -> None:
    reports = measure(served.engine_url, MODEL, [1, 4, 16], 2, tmp_path)
    cpu = measure_cpu()
    logged = re.search(r"KV cache size: ([\d,]+) tokens", (served.home / "logs" / f"engine-{MODEL}.log").read_text())
    assert logged and kv_tokens_on(load_catalog().get(MODEL).config(), cpu, 1) == int(logged[1].replace(",", ""))
    assert json.loads(reports[4].read_text())["config"]["engine_version"] == installed_engine_version() is not None
    rows = compare_levels(reports, MODEL, 4, cpu)
    errors = {r.concurrency: round(r.calibrated_error, 3) for r in rows}
    assert all(abs(e) <= 0.25 for e in errors.values()), errors
    assert rows[-1].measured_tps > rows[0].measured_tps  # the engine batches: the model is not fitting noise

    sized = subprocess.run(
        [sys.executable, "-m", "deploykit", "size", MODEL, "--rps", "0.5", "--input-tokens", "64",
         "--output-tokens", "32", "--from-loadtest", str(reports[4]), "--gpus", "l4", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert sized.returncode == 0, sized.stderr
    data = json.loads(sized.stdout)
    cpu_option = next(o for o in data["options"] if o["hardware"] == "cpu")
    assert cpu_option["source"] == "calibrated" and data["calibration"]["concurrency"] == 4
    assert next(o for o in data["options"] if o["hardware"] == "l4")["source"] == "estimated"
    assert not any("engine" in w for w in data["warnings"])  # the run recorded the vLLM installed here
