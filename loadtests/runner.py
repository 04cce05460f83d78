"""Run a load test headless with locust in this process and return its report.

Importing this module imports locust, which monkey-patches the process for gevent: only the load-test
code path imports it (the CLI lazily), never the gateway's process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent
import psutil
from locust.env import Environment

from deploykit.loadtests.config import LoadTestConfig
from deploykit.loadtests.metrics import Distribution, parse_slos, summarize
from deploykit.loadtests.openai_user import RunState, user_for
from deploykit.loadtests.report import LoadTestReport

_TICK_S = 0.05  # the generator-health probe: how late a 50 ms sleep wakes up


@dataclass(frozen=True)
class Progress:
    elapsed_s: float
    duration_s: float
    done: int
    errors: int


def probe_lag(lags: list[float]) -> None:
    """The generator-health probe, run as a greenlet: how late each 50 ms sleep wakes up."""
    while True:
        before = time.monotonic()
        gevent.sleep(_TICK_S)
        lags.append(time.monotonic() - before - _TICK_S)


def health_problems(config: LoadTestConfig, lag: Distribution | None, cpu_percent: float) -> list[str]:
    """Why the load generator, not the server, may have been the bottleneck (an empty list: a valid run)."""
    problems = []
    if lag is not None and lag.p99 > config.max_schedule_lag_s:
        problems.append(
            f"the load generator ran {lag.p99 * 1000:.1f} ms late at p99 (limit "
            f"{config.max_schedule_lag_s * 1000:.0f} ms): it, not the server, may be the bottleneck"
        )
    if cpu_percent > 90:
        problems.append(f"the load generator used {cpu_percent:.0f}% of a core")
    return problems


def run_load(config: LoadTestConfig, on_progress: Callable[[Progress], None] = lambda _p: None) -> LoadTestReport:
    slos = parse_slos(config.slos)
    state = RunState(config)
    env = Environment(user_classes=[user_for(state)])
    runner = env.create_local_runner()
    process = psutil.Process()
    process.cpu_percent()
    lags: list[float] = []
    prober = gevent.spawn(probe_lag, lags)
    state.reset(config)
    runner.start(config.users, spawn_rate=100)
    deadline = state.started + config.duration_s
    while time.monotonic() < deadline and not (config.max_requests and len(state.records) >= config.max_requests):
        gevent.sleep(0.25)
        done = len(state.records)
        errors = sum(1 for r in state.records if r.error)
        on_progress(Progress(time.monotonic() - state.started, config.duration_s, done, errors))
    ended = time.monotonic()
    state.stopping = True
    runner.quit()  # requests in flight are cut off; they are outside the window and not counted
    prober.kill()
    cpu = process.cpu_percent()
    window = (state.started + config.warmup_s, ended - config.cooldown_s)
    records = [r for r in state.records if r.end <= ended]
    summary = summarize(records, window, slos)
    lag = Distribution.of(lags)
    return LoadTestReport(
        config=config,
        summary=summary,
        records=records,
        schedule_lag=lag,
        generator_cpu_percent=cpu,
        invalid_reasons=health_problems(config, lag, cpu),
        started=state.started,
        ended=ended,
    )
