"""A load test's report: summary and per-request records, written as JSON and CSV, and read back."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deploykit.loadtests.config import LoadTestConfig
from deploykit.loadtests.metrics import Distribution, Summary
from deploykit.loadtests.records import RequestRecord
from deploykit.loadtests.saturation import Saturation, judge
from deploykit.loadtests.server_view import ServerSample

STALL_SHARE = 0.005  # of the run spent in stalls past the lag limit: more, and the p99 of timestamps is theirs


def stalled(lags: Sequence[float], limit_s: float, duration_s: float) -> float:
    """The share of a run the generator spent stalled past `limit_s` (its probe's late wake-ups added up):
    every stream's events in a stall are timed late by it, so a run's timestamps are late past the limit at
    about that share of its events (calibrated with benchmarks/timing.py)."""
    return sum(lag for lag in lags if lag > limit_s) / duration_s if duration_s > 0 else 0.0


def health_problems(
    config: LoadTestConfig, lag: Distribution | None, cpu_percent: float, stalled_share: float = 0.0
) -> list[str]:
    """Why the load generator, not the server, may have been the bottleneck (an empty list: a valid run)."""
    problems = []
    if lag is not None and lag.p99 > config.max_schedule_lag_s:
        problems.append(
            f"the load generator ran {lag.p99 * 1000:.1f} ms late at p99 (limit "
            f"{config.max_schedule_lag_s * 1000:.0f} ms): it, not the server, may be the bottleneck"
        )
    if stalled_share > STALL_SHARE:
        problems.append(
            f"the load generator stalled for {stalled_share:.1%} of the run in pauses over "
            f"{config.max_schedule_lag_s * 1000:.0f} ms: events it timed then were late by that much, enough to "
            "make its p99 latencies its own"
        )
    if cpu_percent > 90:
        problems.append(f"the load generator used {cpu_percent:.0f}% of a core")
    return problems


@dataclass
class LoadTestReport:
    config: LoadTestConfig
    summary: Summary
    records: list[RequestRecord]
    schedule_lag: Distribution | None
    generator_cpu_percent: float
    invalid_reasons: list[str] = field(default_factory=list)
    started: float = 0.0  # time.monotonic() of the run's start and end (one clock for every process)
    ended: float = 0.0
    server: list[ServerSample] = field(default_factory=list)  # the server's /metrics, once a second
    server_notes: list[str] = field(default_factory=list)  # why there are none, or why they stopped
    finished_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))  # wall clock
    stopped_early: str | None = None  # why the run ended before its duration (a server past saturation)

    @property
    def valid(self) -> bool:
        return not self.invalid_reasons

    @property
    def saturation(self) -> Saturation:
        """Whether the server kept up: a growing queue of waits (open loop) or at the server (closed loop)."""
        window = (self.started + self.config.warmup_s, self.ended - self.config.cooldown_s)
        return judge(self.config, self.records, window, [(s.at, s.waiting) for s in self.server])

    def to_json(self, with_records: bool = True) -> dict[str, object]:
        data: dict[str, object] = {
            "config": self.config.model_dump(exclude={"api_key"}),
            "summary": self.summary.to_json(),
            "valid": self.valid,
            "invalid_reasons": self.invalid_reasons,
            "schedule_lag": self.schedule_lag.__dict__ if self.schedule_lag else None,
            "generator_cpu_percent": self.generator_cpu_percent,
            "started": self.started,
            "ended": self.ended,
            "server_metrics": [s.to_json() for s in self.server],
            "server_notes": self.server_notes,
            "finished_at": self.finished_at,
            "saturation": self.saturation.to_json(),
            "stopped_early": self.stopped_early,
        }
        if with_records:
            data["records"] = [r.to_json() for r in self.records]
        return data

    def write(self, json_path: Path, csv_path: Path | None = None) -> None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = json_path.with_suffix(json_path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(json_path)  # a reader never sees half a report
        if csv_path is not None:
            with csv_path.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(
                    [
                        "scheduled",
                        "sent",
                        "end",
                        "status",
                        "error",
                        "ttft",
                        "ttft_from_schedule",
                        "tpot",
                        "e2e",
                        "output_tokens",
                        "input_tokens",
                        "usage_reported",
                        "counted_by",
                        "ttft_answer",
                        "events",
                    ]
                )
                for r in self.records:
                    writer.writerow(
                        [
                            r.scheduled,
                            r.sent,
                            r.end,
                            r.status,
                            r.error or "",
                            r.ttft,
                            r.ttft_from_schedule,
                            r.tpot,
                            r.e2e,
                            r.output_tokens,
                            r.input_tokens,
                            r.usage_reported,
                            r.counted_by,
                            r.ttft_answer,
                            len(r.events),
                        ]
                    )


def shifted(part: dict[str, Any], seconds: float) -> dict[str, Any]:
    """A worker's part of a run (its records and unfinished requests, as JSON) with every time moved by
    `seconds`: onto the master's clock, for a worker on another host."""
    moved = {}
    for kind in ("records", "unfinished"):
        records = records_from_json(part[kind])
        for record in records:
            record.shift(seconds)
        moved[kind] = [r.to_json() for r in records]
    return part | moved


def records_from_json(data: list[dict[str, object]]) -> list[RequestRecord]:
    records = []
    for raw in data:
        record = RequestRecord(**raw)  # type: ignore[arg-type]
        record.events = [(float(t), int(k)) for t, k in record.events]
        records.append(record)
    return records
