"""Two load-test reports side by side (e.g. self-hosted vs a managed API)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from deploykit.core.errors import UsageError

# (label, path into the summary, unit scale, unit)
_ROWS = (
    ("requests/s", ("rps",), 1, ""),
    ("output tokens/s", ("output_tokens_per_s",), 1, ""),
    ("goodput req/s", ("goodput_rps",), 1, ""),
    ("SLO attainment", ("slo_attainment",), 100, "%"),
    ("TTFT p50", ("ttft", "p50"), 1000, "ms"),
    ("TTFT p95", ("ttft", "p95"), 1000, "ms"),
    ("ITL p50", ("itl", "p50"), 1000, "ms"),
    ("ITL p95", ("itl", "p95"), 1000, "ms"),
    ("TPOT p50", ("tpot", "p50"), 1000, "ms"),
    ("e2e p50", ("e2e", "p50"), 1000, "ms"),
    ("e2e p99", ("e2e", "p99"), 1000, "ms"),
)


@dataclass(frozen=True)
class Row:
    metric: str
    a: float | None
    b: float | None
    unit: str

    @property
    def ratio(self) -> float | None:
        return self.b / self.a if self.a and self.b is not None else None

    def cells(self) -> list[str]:
        """The row as shown in the terminal and on the page: metric, A, B (with units), B / A."""

        def shown(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f} {self.unit}".strip()

        return [self.metric, shown(self.a), shown(self.b), "-" if self.ratio is None else f"{self.ratio:.2f}"]


def load_report(path: Path) -> dict[str, object]:
    try:
        report: dict[str, object] = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"Cannot read the report {path}: {e}.") from e
    if "summary" not in report:
        raise UsageError(f"{path} is not a single-run report (a sweep's curve lists one report per level).")
    return report


def compare(a: dict[str, object], b: dict[str, object]) -> list[Row]:
    def pick(report: dict[str, object], keys: tuple[str, ...], scale: float) -> float | None:
        value: object = report["summary"]
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return float(value) * scale if isinstance(value, int | float) else None

    return [Row(label, pick(a, keys, scale), pick(b, keys, scale), unit) for label, keys, scale, unit in _ROWS]
