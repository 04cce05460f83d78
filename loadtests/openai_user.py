"""A locust user for OpenAI-compatible endpoints (streaming by default), bound to one run's state (state.py).

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

import gevent
from locust import User, task

from deploykit.loadtests.config import LoadTestConfig
from deploykit.loadtests.records import RequestRecord
from deploykit.loadtests.request import Endpoint, request_body, send
from deploykit.loadtests.state import RunState


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
        self.environment.events.request.fire(  # type: ignore[no-untyped-call]
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
