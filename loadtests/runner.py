"""Run a load test headless with locust in this process and return its report.

Importing this module imports locust, which monkey-patches the process for gevent: only the load-test
code path imports it (the CLI lazily), never the gateway's process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent
import psutil
import requests
from locust.env import Environment

from deploykit.core.slo import parse_slos
from deploykit.loadtests.config import LoadTestConfig
from deploykit.loadtests.metrics import Distribution, summarize
from deploykit.loadtests.openai_user import user_for
from deploykit.loadtests.report import LoadTestReport, health_problems, stalled
from deploykit.loadtests.saturation import past_saturation
from deploykit.loadtests.server_view import ServerSample, read_sample
from deploykit.loadtests.state import RunState

_TICK_S = 0.01  # the generator-health probe: how late a 10 ms sleep wakes up (100 samples a second, so that
# p99 means something on a run of a few seconds rather than being its one worst hiccup)


@dataclass(frozen=True)
class Progress:
    elapsed_s: float
    duration_s: float
    done: int
    errors: int


def probe_lag(lags: list[float]) -> None:
    """The generator-health probe, run as a greenlet: how late each short sleep wakes up."""
    while True:
        before = time.monotonic()
        gevent.sleep(_TICK_S)
        lags.append(time.monotonic() - before - _TICK_S)


def scrape_server(config: LoadTestConfig, samples: list[ServerSample], notes: list[str], every_s: float = 1.0) -> None:
    """The server's /metrics once a second, as a greenlet; it stops at the first answer without vLLM's
    metrics (a managed API, say), noting why. A deploykit gateway with keys on wants its metrics token
    (DEPLOYKIT_METRICS_TOKEN in this environment)."""
    if config.azure_deployment:
        notes.append("Azure OpenAI exports no server metrics")
        return
    url = config.url.rstrip("/").removesuffix("/v1") + "/metrics"
    token = os.environ.get("DEPLOYKIT_METRICS_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else config.headers()
    while True:
        try:
            response = requests.get(url, headers=headers, timeout=2)
        except requests.RequestException as e:
            notes.append(f"{url} did not answer ({type(e).__name__})")
            return
        sample = read_sample(response.text, time.monotonic()) if response.status_code == 200 else None
        if sample is None:
            notes.append(f"{url} answered {response.status_code} without vLLM's metrics")
            return
        samples.append(sample)
        gevent.sleep(every_s)


def run_load(config: LoadTestConfig, on_progress: Callable[[Progress], None] = lambda _p: None) -> LoadTestReport:
    slos = parse_slos(config.slos)
    state = RunState(config)
    env = Environment(user_classes=[user_for(state)])
    runner = env.create_local_runner()
    process = psutil.Process()
    process.cpu_percent()
    lags: list[float] = []
    prober = gevent.spawn(probe_lag, lags)
    server: list[ServerSample] = []
    notes: list[str] = []
    scraper = gevent.spawn(scrape_server, config, server, notes)
    state.reset(config)
    runner.start(config.users, spawn_rate=100)
    deadline = state.started + config.duration_s
    stopped_early, looked = None, state.started
    while time.monotonic() < deadline and not (config.max_requests and len(state.records) >= config.max_requests):
        gevent.sleep(0.25)
        done = len(state.records)
        errors = sum(1 for r in state.records if r.error)
        on_progress(Progress(time.monotonic() - state.started, config.duration_s, done, errors))
        if config.concurrency is None and time.monotonic() - looked >= 1.0:  # an open loop past saturation
            looked = time.monotonic()
            stopped_early = past_saturation(state.records, (state.started + config.warmup_s, looked))
            if stopped_early:
                break
    ended = time.monotonic()
    prober.kill()  # before stopping the users, which stalls the process for tens of ms: not the run's timing
    state.stopping = True
    runner.quit()  # requests in flight are cut off: not counted as requests, but their tokens so far are
    scraper.kill()
    cpu = process.cpu_percent()
    window = (state.started + config.warmup_s, ended - config.cooldown_s)
    records = [r for r in state.records if r.end <= ended]
    summary = summarize(records, window, slos, state.unfinished(ended))
    lag = Distribution.of(lags)
    return LoadTestReport(
        config=config,
        summary=summary,
        records=records,
        schedule_lag=lag,
        generator_cpu_percent=cpu,
        invalid_reasons=health_problems(
            config, lag, cpu, stalled(lags, config.max_schedule_lag_s, ended - state.started)
        ),
        started=state.started,
        ended=ended,
        server=server,
        server_notes=notes,
        stopped_early=stopped_early,
    )
