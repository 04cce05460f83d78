"""What a load test hands back, as types: one run's result (its report without the per-request records), a
sweep's curve, a search's levels and answer. Each is written as JSON and read back by the same model, so
the files and the code cannot drift apart."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from deploykit.loadtests.config import LoadTestConfig
from deploykit.loadtests.metrics import Distribution, Summary


class RunResult(BaseModel):
    """One run: its configuration, summary and validity (`deploykit loadtest run --out` holds the records)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    config: LoadTestConfig
    summary: Summary
    valid: bool
    invalid_reasons: list[str]
    schedule_lag: Distribution | None
    generator_cpu_percent: float
    started: float = 0.0
    ended: float = 0.0
    server_metrics: list[dict[str, float | None]] = []  # the server's /metrics once a second (server_view.py)
    server_notes: list[str] = []
    finished_at: str = ""  # when the run ended, UTC (ISO 8601); empty in reports written before it was kept
    saturation: dict[str, object] | None = None  # loadtests/saturation.py: did the server keep up
    stopped_early: str | None = None  # why the run ended before its duration

    @property
    def saturated(self) -> bool:
        return bool(self.saturation and self.saturation.get("saturated"))

    @classmethod
    def read(cls, path: Path) -> RunResult:
        return cls.model_validate_json(path.read_text())


class LevelResult(RunResult):
    """One level of a sweep or a search: the run, at `load` (streams, or requests a second), written to `report`."""

    load: float
    report: str
    passed: bool | None = None  # a search: every SLO met and nothing failed
    tried: int | None = None  # a search: this level was the n-th tried, from 1


class Curve(BaseModel):
    """A sweep: one run per load level, in order (an open loop's stop after the first saturated one)."""

    sweep: Literal["concurrency", "rate"]
    runs: list[LevelResult]
    skipped: list[float] = []  # levels not run: past one the server could not keep up with


class Search(BaseModel):
    """A search for the highest load that meets every SLO: the answer and every level tried."""

    search: Literal["concurrency", "rate"]
    best: float | None  # None: even the first level failed
    limit_reached: bool  # every level up to the limit passed
    slos: str
    runs: list[LevelResult]  # by load
