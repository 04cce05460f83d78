"""More load than one process gives: locust's own master and worker processes, records merged exactly.

The master (the load-test process) spawns `processes` workers (`python -m deploykit.loadtests --worker`), or,
with `master_port`, waits for that many to connect from elsewhere (`deploykit loadtest worker HOST:PORT`:
other hosts, pods of a Kubernetes Job). It sends each the run's config (without the API key: a worker
takes its own from OPENAI_API_KEY, so no secret crosses the wire), lets locust spread the users over them,
and stops them when the run ends. Each worker runs its share of the load (config.split(), chosen by the
index locust gives it) and, asked at the end, sends every record to the master as a custom message. Workers
on this machine stamp with the master's monotonic clock, so their merged records are the run's exact
per-request data; a remote worker's records are moved onto the master's clock by the two hosts' wall
clocks (time.time() - time.monotonic() on each), as exact as NTP keeps them (about a millisecond).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import gevent
import psutil
from locust.env import Environment
from locust.runners import WorkerRunner

from deploykit.core.errors import LoadTestError
from deploykit.core.ports import free_port
from deploykit.core.slo import parse_slos
from deploykit.loadtests.config import LoadTestConfig
from deploykit.loadtests.metrics import Distribution, summarize
from deploykit.loadtests.openai_user import user_for
from deploykit.loadtests.report import LoadTestReport, health_problems, records_from_json, shifted, stalled
from deploykit.loadtests.runner import Progress, probe_lag, scrape_server
from deploykit.loadtests.server_view import ServerSample
from deploykit.loadtests.state import RunState

_RECORDS = "deploykit_records"
_FLUSH = "deploykit_flush"
_CONFIG = "deploykit_config"
# a worker's users exist before the master's config arrives: they wait on this stand-in until the run starts
_UNSET = LoadTestConfig(url="http://config.from.master.invalid", model="-", concurrency=1)


def run_distributed(
    config: LoadTestConfig,
    on_progress: Callable[[Progress], None] = lambda _p: None,
    *,
    connect_timeout_s: float | None = None,
) -> LoadTestReport:
    remote = config.master_port is not None
    connect_timeout_s = connect_timeout_s or (600.0 if remote else 60.0)  # pods of a Job may wait for a node
    port = config.master_port or free_port()
    env = Environment(user_classes=[user_for(RunState(config))])
    master = env.create_master_runner("0.0.0.0" if remote else "127.0.0.1", port)
    finals: dict[str, dict[str, Any]] = {}
    counts: dict[str, tuple[int, int]] = {}
    master.register_message(_RECORDS, lambda environment, msg, **_kw: finals.__setitem__(msg.node_id, msg.data))
    env.events.worker_report.add_listener(  # type: ignore[no-untyped-call]
        lambda client_id, data, **_kw: counts.__setitem__(client_id, data.get("deploykit_progress", (0, 0)))
    )
    worker_cmd = [sys.executable, "-m", "deploykit.loadtests", "--worker", "127.0.0.1", str(port)]
    key = {"OPENAI_API_KEY": config.api_key} if config.api_key else {}
    env_vars = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"} | key
    workers = [] if remote else [subprocess.Popen(worker_cmd, env=env_vars) for _ in range(config.processes)]
    try:
        _await(lambda: len(master.clients.ready) >= config.processes, workers, connect_timeout_s, "connect")
        master.send_message(_CONFIG, config.model_dump(mode="json", exclude={"api_key"}))
        started = time.monotonic()
        server: list[ServerSample] = []
        notes: list[str] = []
        scraper = gevent.spawn(scrape_server, config, server, notes)
        master.start(config.users, spawn_rate=100 * config.processes)  # all users within a second
        deadline = started + config.duration_s
        while time.monotonic() < deadline:
            gevent.sleep(0.25)
            done, errors = (sum(c[i] for c in counts.values()) for i in (0, 1))
            on_progress(Progress(time.monotonic() - started, config.duration_s, done, errors))
            if config.max_requests and done >= config.max_requests:
                break
        ended = time.monotonic()
        scraper.kill()
        master.stop()  # the workers stop their users: requests in flight are cut off (their tokens so far count)
        _await(lambda: not master.clients.running and not master.clients.spawning, workers, 30, "stop")
        master.send_message(_FLUSH)
        _await(lambda: len(finals) >= config.processes, workers, 30, "send its records")
        master.quit()
    finally:
        for worker in workers:
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
    parts = list(finals.values())
    if remote:  # each worker's records onto this process's clock
        clock = time.time() - time.monotonic()
        parts = [shifted(part, part["clock"] - clock) for part in parts]
    report = _merge(config, parts, started, ended)
    report.server, report.server_notes = server, notes
    return report


def _merge(config: LoadTestConfig, parts: list[dict[str, Any]], started: float, ended: float) -> LoadTestReport:
    every = [r for part in parts for r in records_from_json(part["records"])]
    records = sorted((r for r in every if r.end <= ended), key=lambda r: r.scheduled)
    unfinished = [r for r in every if r.end > ended] + [
        r for part in parts for r in records_from_json(part["unfinished"])
    ]
    lags = [Distribution(**part["lag"]) for part in parts if part["lag"]]
    lag = max(lags, key=lambda d: d.p99) if lags else None  # the worst worker
    cpu = max(float(part["cpu"]) for part in parts)  # each worker has its own core's worth; the busiest counts
    stall = max(float(part.get("stalled", 0.0)) for part in parts)
    return LoadTestReport(
        config=config,
        summary=summarize(
            records, (started + config.warmup_s, ended - config.cooldown_s), parse_slos(config.slos), unfinished
        ),
        records=records,
        schedule_lag=lag,
        generator_cpu_percent=cpu,
        invalid_reasons=health_problems(config, lag, cpu, stall),
        started=started,
        ended=ended,
    )


def serve_worker(master_host: str, master_port: int) -> None:
    """A worker process: takes the run's config from the master (and the API key from its own environment),
    runs the users locust gives it with its share of the schedule, until told to quit."""
    given: list[LoadTestConfig] = []
    state = RunState(_UNSET)
    env = Environment(user_classes=[user_for(state)])
    runner: WorkerRunner = env.create_worker_runner(master_host, master_port)
    process = psutil.Process()
    lags: list[float] = []
    prober = gevent.spawn(probe_lag, lags)

    def configure(environment: Environment, msg: Any, **_kw: object) -> None:
        given.append(LoadTestConfig.model_validate({**msg.data, "api_key": os.environ.get("OPENAI_API_KEY")}))

    run_lags: list[float] = []  # the probe's samples while the run ran, not while it started or stopped

    def start(**_kw: object) -> None:
        config = given[-1]  # the master's config message comes before its start, on the same connection
        share = config.split()[runner.worker_index % config.processes]
        state.reset(share)
        process.cpu_percent()
        lags.clear()

    def stop(**_kw: object) -> None:
        run_lags[:] = lags

    def report(client_id: str, data: dict[str, Any], **_kw: object) -> None:
        data["deploykit_progress"] = (len(state.records), sum(1 for r in state.records if r.error))

    # this Environment's own hooks: locust's module-level `events` are only the ones its own CLI wires up
    env.events.test_start.add_listener(start)  # type: ignore[no-untyped-call]
    env.events.test_stopping.add_listener(stop)  # type: ignore[no-untyped-call]  # before the users stop
    env.events.report_to_master.add_listener(report)  # type: ignore[no-untyped-call]

    def flush(environment: Environment, msg: object, **_kw: object) -> None:
        lag = Distribution.of(run_lags)
        payload = {
            "records": [r.to_json() for r in state.records],
            "unfinished": [r.to_json() for r in state.unfinished(float("inf"))],
            "lag": None if lag is None else lag.__dict__,
            "cpu": process.cpu_percent(),
            "stalled": stalled(run_lags, state.config.max_schedule_lag_s, time.monotonic() - state.started),
            "clock": time.time() - time.monotonic(),  # for a master on another host
        }
        runner.send_message(_RECORDS, payload)

    runner.register_message(_CONFIG, configure)
    runner.register_message(_FLUSH, flush)
    runner.greenlet.join()
    prober.kill()


def _await(condition: Callable[[], bool], workers: list[subprocess.Popen[bytes]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        dead = [w.returncode for w in workers if w.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"exited with status {dead[0]}" if dead else f"did not {what} within {timeout:.0f} s"
            raise LoadTestError(f"A load-generator worker {why}.", "Its output is above.")
        gevent.sleep(0.05)
