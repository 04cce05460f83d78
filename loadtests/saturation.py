"""Whether the server kept up with a run's load: a queue that grows over the run is saturation, whatever its
latency percentiles say (they average a calm start with a long end, and a short run at capacity can meet
an SLO that a longer one would miss).

An open loop (a rate, or a trace): while the server keeps up, the wait from a request's scheduled time to
its first token is stationary; above capacity the backlog grows linearly, at capacity like the square root
of time, and either way later requests wait longer. The test: the waits of the requests due in the last
third of the window against those due in the first third, one-sided Mann-Whitney U (normal approximation,
ties averaged): a growing queue ranks the later waits higher whatever its shape, where a slope fitted on a
short window can miss the square-root growth. The waits of a stable queue are correlated over seconds (a
busy spell late in a run makes the last third's waits larger in rank, p tiny), so two more conditions:
the later median wait at least `MIN_GROWTH` and `MIN_GROWTH_S` longer, and almost none of the last
third's requests (at most `MAX_UNQUEUED`) served as quickly as the quickest of the run: a stable queue
still empties now and then, a saturated one no longer does. Undecided with fewer than `MIN_PER_THIRD`
answers in a third. Its error rates on simulated queues, by load and run length: docs/PERFORMANCE.md
(`python -m benchmarks.saturation`).

A closed loop cannot build a queue at the client (each user waits for its answer); the server's own queue
shows it: saturated when the server reported requests waiting in most of the samples of the last two thirds
(vLLM's num_requests_waiting, from its /metrics); undecided without those samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from deploykit.loadtests.config import LoadTestConfig
from deploykit.loadtests.records import RequestRecord

ALPHA = 0.001
MIN_GROWTH = 0.25
MIN_GROWTH_S = 0.020
MIN_PER_THIRD = 12
MAX_UNQUEUED = 0.02  # the share of the last third's requests served without queueing a saturated server leaves


@dataclass(frozen=True)
class Saturation:
    saturated: bool | None  # None: too little to tell
    why: str
    p_value: float | None = None  # open loop: the Mann-Whitney test's
    early_wait_s: float | None = None  # open loop: median wait of the first third
    late_wait_s: float | None = None  # and of the last
    waiting_share: float | None = None  # closed loop: share of the server's samples with requests waiting

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def past_saturation(records: Sequence[RequestRecord], window: tuple[float, float]) -> str | None:
    """While an open loop runs: why to stop it now, if its queue has grown beyond doubt (p < ALPHA / 100: the
    rest of the run would only measure a backlog). Requests still waiting are not counted yet, which makes
    the test slower to say so, never quicker."""
    verdict = open_loop(records, window)
    if verdict.saturated and verdict.p_value is not None and verdict.p_value < ALPHA / 100:
        return f"past saturation: {verdict.why}"
    return None


def judge(
    config: LoadTestConfig,
    records: Sequence[RequestRecord],
    window: tuple[float, float],
    waiting: Sequence[tuple[float, float | None]],
) -> Saturation:
    """The run's verdict: from the waits of an open loop, or the server's queue for a closed one."""
    return open_loop(records, window) if config.concurrency is None else closed_loop(waiting, window)


def open_loop(records: Sequence[RequestRecord], window: tuple[float, float]) -> Saturation:
    """Did the waits (schedule to first token) grow over the window? Only answered requests count."""
    start, end = window
    third = (end - start) / 3
    waits = [(r.scheduled, r.ttft_from_schedule) for r in records if r.ok and r.events and start <= r.scheduled < end]
    early = [w for t, w in waits if w is not None and t < start + third]
    late = [w for t, w in waits if w is not None and t >= end - third]
    if min(len(early), len(late)) < MIN_PER_THIRD:
        return Saturation(None, f"fewer than {MIN_PER_THIRD} answers in the first or last third of the window")
    p = mann_whitney_greater(late, early)
    before, after = _median(early), _median(late)
    unqueued = min(early + late) * (1 + MIN_GROWTH) + 0.005  # a wait no longer than the quickest: no queue
    straight = sum(w <= unqueued for w in late) / len(late)
    grew = after >= before * (1 + MIN_GROWTH) and after - before >= MIN_GROWTH_S
    saturated = p < ALPHA and grew and straight <= MAX_UNQUEUED
    why = (
        f"the queue grew: requests due in the last third waited {after * 1000:.0f} ms (median) to their first "
        f"token, those in the first {before * 1000:.0f} ms (p = {p:.1g}), and {straight:.0%} went straight in"
        if saturated
        else f"no growing queue: median wait {before * 1000:.0f} ms in the first third, {after * 1000:.0f} ms in "
        f"the last (p = {p:.2g}); {straight:.0%} of the last went straight in"
    )
    return Saturation(saturated, why, p, before, after)


def closed_loop(waiting: Sequence[tuple[float, float | None]], window: tuple[float, float]) -> Saturation:
    """`waiting`: (time, requests waiting at the server) samples; saturated when most of the last two thirds'
    samples had some."""
    start, end = window
    later = [w for t, w in waiting if t >= start + (end - start) / 3 and t <= end and w is not None]
    if len(later) < 3:
        return Saturation(None, "the server reported no queue (no vLLM metrics)")
    share = sum(w > 0 for w in later) / len(later)
    if share > 0.5:
        return Saturation(True, f"requests waited at the server in {share:.0%} of its samples", waiting_share=share)
    return Saturation(False, f"requests waited at the server in {share:.0%} of its samples", waiting_share=share)


def mann_whitney_greater(xs: Sequence[float], ys: Sequence[float]) -> float:
    """One-sided p-value that xs tend to be larger than ys (Mann-Whitney U, normal approximation with the
    tie correction and a continuity correction)."""
    pooled = sorted([(v, 0) for v in xs] + [(v, 1) for v in ys])
    ranks = [0.0] * len(pooled)
    i, ties = 0, 0.0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        size = j - i + 1
        ties += size**3 - size
        i = j + 1
    n1, n2 = len(xs), len(ys)
    u = sum(rank for rank, (_, group) in zip(ranks, pooled, strict=True) if group == 0) - n1 * (n1 + 1) / 2
    n = n1 + n2
    variance = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    if variance <= 0:
        return 1.0
    z = (u - n1 * n2 / 2 - 0.5) / math.sqrt(variance)
    return 0.5 * math.erfc(z / math.sqrt(2))


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
