"""Latency objectives (`ttft_p95=1s,tpot_p95=50ms`): what a load test judges goodput by and what sizing
must meet, so both read them the same way."""

from __future__ import annotations

import re
from dataclasses import dataclass

from deploykit.core.errors import UsageError

_UNITS = {"ms": 1e-3, "s": 1.0}
METRICS = ("ttft", "tpot", "itl", "e2e")


@dataclass(frozen=True)
class Slo:
    """A latency objective, e.g. ttft_p95=1s: per request, `metric` at most `limit` seconds; for the run,
    the `pct` percentile of it at most `limit`."""

    metric: str  # ttft | tpot | itl | e2e
    pct: int
    limit: float


def parse_slos(text: str) -> list[Slo]:
    """'ttft_p95=1s,tpot_p95=50ms' -> SLOs."""
    slos = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(ttft|tpot|itl|e2e)_p(50|90|95|99)=([\d.]+)(ms|s)", part)
        if not m:
            raise UsageError(
                f"'{part}' is not an SLO.",
                "Write them as ttft_p95=1s,tpot_p95=50ms: ttft, tpot, itl or e2e; p50, p90, p95 or p99; s or ms.",
            )
        slos.append(Slo(m[1], int(m[2]), float(m[3]) * _UNITS[m[4]]))
    return slos
