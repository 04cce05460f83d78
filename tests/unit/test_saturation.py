"""The saturation test (loadtests/saturation.py) on queues simulated with known capacity: steady below it,
caught above it and at it (where the backlog grows only like the square root of time), undecided on too
little; its Mann-Whitney p-values against scipy's; the closed loop's verdict from the server's queue."""

from __future__ import annotations

import random

import pytest
from scipy.stats import mannwhitneyu

from benchmarks.saturation import rate, simulated
from deploykit.loadtests.records import RequestRecord
from deploykit.loadtests.saturation import closed_loop, mann_whitney_greater, open_loop, past_saturation


def test_false_alarms_are_rare_below_capacity_and_overload_is_caught() -> None:
    """On the same 100 seeded runs each time (benchmarks/saturation.py prints the whole table)."""
    assert rate(0.8, 20, 100) <= 0.02 and rate(0.85, 20, 100) <= 0.05
    assert rate(1.15, 20, 100) >= 0.95 and rate(1.2, 10, 100) >= 0.95
    records = simulated(1.15, 20, seed=0)
    verdict = open_loop(records, (0.0, 20.0))
    assert verdict.saturated is True and verdict.late_wait_s > verdict.early_wait_s + 0.5  # type: ignore[operator]
    assert "the queue grew" in verdict.why and "went straight in" in verdict.why
    assert past_saturation(records, (0.0, 20.0)) is not None  # past doubt: the run stops early
    assert past_saturation(simulated(0.8, 20, seed=0), (0.0, 20.0)) is None


def test_at_capacity_the_queue_is_caught_given_time() -> None:
    """At capacity the backlog is a random walk: it grows like the square root of time, and the test sees it
    more often the longer the run (a slope over a short window would not)."""
    assert rate(1.0, 600, 20) >= 0.85 > rate(1.0, 10, 20)


def test_too_few_answers_decide_nothing() -> None:
    verdict = open_loop(simulated(1.5, 2, seed=1), (0.0, 2.0))
    assert verdict.saturated is None and "fewer than 12" in verdict.why
    errors = [RequestRecord(scheduled=t, sent=t, end=t + 1, status=500, error="5xx") for t in range(60)]
    assert open_loop(errors, (0.0, 60.0)).saturated is None  # only answered requests have a wait


def test_the_p_values_are_scipys() -> None:
    rng = random.Random(3)
    for n1, n2, shift, places in ((20, 25, 0.0, None), (30, 30, 0.3, None), (15, 40, 0.1, 1), (50, 50, -0.2, 1)):
        xs, ys = [rng.gauss(shift, 1) for _ in range(n1)], [rng.gauss(0, 1) for _ in range(n2)]
        if places is not None:  # ties
            xs, ys = [round(x, places) for x in xs], [round(y, places) for y in ys]
        theirs = mannwhitneyu(xs, ys, alternative="greater", method="asymptotic", use_continuity=True).pvalue
        assert mann_whitney_greater(xs, ys) == pytest.approx(theirs, rel=1e-9)
    assert mann_whitney_greater([1.0, 1.0], [1.0, 1.0]) == 1.0  # all tied: no evidence


def test_a_closed_loop_is_judged_by_the_servers_queue() -> None:
    waiting = [(float(t), 2.0 if t > 3 else 0.0) for t in range(10)]
    assert closed_loop(waiting, (0.0, 9.0)).saturated is True
    assert closed_loop([(float(t), 0.0) for t in range(10)], (0.0, 9.0)).saturated is False
    assert closed_loop([(float(t), None) for t in range(10)], (0.0, 9.0)).saturated is None
    assert closed_loop([], (0.0, 9.0)).why == "the server reported no queue (no vLLM metrics)"
