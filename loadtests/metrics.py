"""From per-request records to a run's summary: latency percentiles from the unrounded data, throughput,
goodput under SLOs, error counts, and whether the load generator kept its schedule."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from deploykit.core.slo import Slo
from deploykit.loadtests.records import RequestRecord

PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class Distribution:
    n: int
    mean: float
    p50: float
    p90: float
    p95: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution | None:
        if not values:
            return None
        ordered = sorted(values)
        p50, p90, p95, p99 = (percentile(ordered, q) for q in PERCENTILES)
        return cls(len(ordered), sum(ordered) / len(ordered), p50, p90, p95, p99)


def meets(slo: Slo, record: RequestRecord) -> bool:
    """Whether one request met the objective (its TTFT counted from the schedule, so queueing counts)."""
    value = {"ttft": record.ttft_from_schedule, "tpot": record.tpot, "e2e": record.e2e}.get(slo.metric)
    if slo.metric == "itl":
        gaps = record.itl()
        value = max(gaps) if gaps else None
    return value is not None and value <= slo.limit


@dataclass(frozen=True)
class Summary:
    requests: int
    ok: int
    errors: dict[str, int]
    window_s: float
    offered_rps: float
    rps: float
    output_tokens_per_s: float
    input_tokens_per_s: float
    ttft: Distribution | None
    ttft_from_schedule: Distribution | None
    itl: Distribution | None
    chunk_gap: Distribution | None
    tpot: Distribution | None
    e2e: Distribution | None
    goodput_rps: float
    slo_attainment: float
    slos_met: dict[str, bool]
    usage_reported: bool  # False when any token count came from the stream instead of the server
    counted_by: dict[str, int]  # requests by how their tokens were counted (records.RequestRecord.counted_by)
    ttft_answer: Distribution | None  # reasoning models: time to the first answer token, after the thinking

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on sorted data."""
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(
    records: Sequence[RequestRecord],
    window: tuple[float, float],
    slos: Sequence[Slo] = (),
    unfinished: Sequence[RequestRecord] = (),
) -> Summary:
    """The steady-state summary: requests scheduled inside `window` (monotonic start, end). `unfinished` are the
    requests cut off at the end of the run: not requests of the summary, but the tokens they had received
    inside the window were delivered there and count towards the output rate."""
    start, end = window
    inside = [r for r in records if start <= r.scheduled < end]
    ok = [r for r in inside if r.ok]
    span = max(end - start, 1e-9)
    good = [r for r in inside if r.ok and all(meets(s, r) for s in slos)]

    def dist(values: list[float | None]) -> Distribution | None:
        return Distribution.of([v for v in values if v is not None])

    summary_itl = [g for r in ok for g in r.itl()]
    distributions = {
        "ttft": dist([r.ttft for r in ok]),
        "tpot": dist([r.tpot for r in ok]),
        "itl": Distribution.of(summary_itl),
        "e2e": dist([r.e2e for r in ok]),
    }
    slos_met = {}
    for s in slos:
        d = distributions[s.metric] if s.metric != "ttft" else dist([r.ttft_from_schedule for r in ok])
        slos_met[f"{s.metric}_p{s.pct}"] = d is not None and percentile_of(d, s.pct) <= s.limit
    return Summary(
        requests=len(inside),
        ok=len(ok),
        errors=dict(Counter(r.error for r in inside if r.error)),
        window_s=span,
        offered_rps=len(inside) / span,
        rps=len(ok) / span,
        # tokens that arrived inside the window, whenever their request started or ended: long requests at
        # high concurrency straddle the window's edges, and counting them whole, or not at all when the run
        # cut them off, would skew the rate (to nothing, where every request outlasts the run)
        output_tokens_per_s=sum(k for r in [*records, *unfinished] if r.ok for t, k in r.events if start <= t < end)
        / span,
        input_tokens_per_s=sum(r.input_tokens for r in ok) / span,
        ttft=distributions["ttft"],
        ttft_from_schedule=dist([r.ttft_from_schedule for r in ok]),
        itl=distributions["itl"],
        chunk_gap=Distribution.of([g for r in ok for g in r.chunk_gaps()]),
        tpot=distributions["tpot"],
        e2e=distributions["e2e"],
        goodput_rps=len(good) / span,
        slo_attainment=len(good) / len(inside) if inside else 0.0,
        slos_met=slos_met,
        usage_reported=all(r.usage_reported for r in ok),
        counted_by=dict(Counter(r.counted_by for r in ok)),
        ttft_answer=dist([r.ttft_answer for r in ok]),
    )


def percentile_of(d: Distribution, pct: int) -> float:
    """A stored percentile; SLOs may only name the ones a summary keeps."""
    value: float = getattr(d, f"p{pct}")
    return value
