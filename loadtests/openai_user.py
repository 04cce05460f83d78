"""A locust user for OpenAI-compatible endpoints (streaming by default), and the shared state of a run.

`deploykit loadtest` drives it headless. It also works as a plain locustfile (web UI, distributed runs):

    DEPLOYKIT_LOADTEST='{"url": "http://127.0.0.1:8000", "model": "smollm2-135m", "concurrency": 8}' \\
        locust -f loadtests/openai_user.py --host http://127.0.0.1:8000

Open loop: one schedule for the whole run (Poisson or gamma arrivals at a rate, or a trace's own arrivals
and lengths); each user takes the next arrival time, waits for it and sends, and latency counts from the
scheduled time, so a slow server cannot hide its queue. Closed loop: each user sends its next request as
soon as the last one ends.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import gevent
from locust import User, events, task

from deploykit.loadtests.config import LoadTestConfig
from deploykit.loadtests.records import RequestRecord
from deploykit.loadtests.request import Endpoint, load_token_counter, request_body, send
from deploykit.loadtests.schedule import Schedule
from deploykit.loadtests.workload import Prompt


@dataclass
class RunState:
    """What the users of one run share: the config, the schedule, and the records."""

    config: LoadTestConfig
    records: list[RequestRecord] = field(default_factory=list)
    in_flight: dict[int, RequestRecord] = field(default_factory=dict)  # each user's request under way
    started: float = field(default_factory=time.monotonic)
    stopping: bool = False

    def __post_init__(self) -> None:
        self._begin(self.config, self.started)

    def reset(self, config: LoadTestConfig) -> None:
        """Start the run now, with this config (a worker's share of the whole one)."""
        self._begin(config, time.monotonic())

    def _begin(self, config: LoadTestConfig, now: float) -> None:
        self.config, self.started = config, now
        self.schedule = Schedule(config, now)
        self.count_tokens = load_token_counter(config.tokenizer) if config.tokenizer else None

    def take(self) -> tuple[float, Prompt] | None:
        """The next request and when it is due; at a trace's end the run stops."""
        taken = self.schedule.take(time.monotonic())
        if taken is None:
            self.stopping = True
        return taken

    def unfinished(self, ended: float) -> list[RequestRecord]:
        """The requests a run that ended at `ended` cut off: still in flight (a user's entry goes as its request
        ends, before the record is kept), or finished after it."""
        return [*self.in_flight.values(), *(r for r in self.records if r.end > ended)]

    def full(self) -> bool:
        limit = self.config.max_requests
        return self.stopping or (limit is not None and len(self.records) >= limit)


class OpenAIUser(User):
    """Configured by one RunState (`state`), set on a subclass per run (see `user_for`). Requests go through
    a keep-alive connection of its own (locust's session would time them at the headers, not per event);
    each one is reported to locust's statistics too, for its web UI."""

    abstract = True
    state: RunState

    def on_start(self) -> None:
        self.endpoint = Endpoint(self.state.config.url, self.state.config.timeout_s)
        self.history: list[dict[str, str]] = []  # this user's conversation so far (with turns > 1)

    def on_stop(self) -> None:
        self.endpoint.reset()

    @task
    def one_request(self) -> None:
        state = self.state
        if state.full():
            gevent.sleep(0.05)
            return
        taken = state.take()
        if taken is None:
            gevent.sleep(0.05)
            return
        scheduled, prompt = taken
        delay = scheduled - time.monotonic()
        if delay > 0:
            gevent.sleep(delay)
        cfg = state.config
        if len(self.history) >= 2 * cfg.turns:
            self.history = []  # the conversation is over: the next request starts another
        body = request_body(cfg, prompt, self.history)
        answer: list[str] | None = [] if cfg.turns > 1 else None
        record = send(self.endpoint, cfg, body, scheduled, state.count_tokens, answer, self._started)
        state.in_flight.pop(id(self), None)
        if answer is not None:
            self.history += [body["messages"][-1], {"role": "assistant", "content": "".join(answer)}]
        state.records.append(record)
        events.request.fire(  # type: ignore[no-untyped-call]
            request_type="POST",
            name=cfg.api,
            response_time=record.e2e * 1000,
            response_length=record.output_tokens,
            exception=RuntimeError(record.error) if record.error else None,
            context={},
        )

    def _started(self, record: RequestRecord) -> None:
        self.state.in_flight[id(self)] = record

    def wait_time(self) -> float:
        return 0.0


def user_for(state: RunState) -> type[OpenAIUser]:
    """A user class bound to one run's state; locust instantiates it once per simulated user."""
    return type("ConfiguredOpenAIUser", (OpenAIUser,), {"state": state, "host": state.config.url, "abstract": False})


if os.environ.get("DEPLOYKIT_LOADTEST"):  # used as a plain locustfile
    ConfiguredOpenAIUser = user_for(RunState(LoadTestConfig.model_validate_json(os.environ["DEPLOYKIT_LOADTEST"])))
