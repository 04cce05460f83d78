"""What the users of one run share: the config, the schedule, the records (free of locust, so that it is
tested in process: importing locust patches the process for gevent)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from deploykit.loadtests.config import LoadTestConfig
from deploykit.loadtests.records import RequestRecord
from deploykit.loadtests.request import load_token_counter
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
    taken: int = 0  # arrivals handed to users so far: --requests bounds these, so no request past it is sent

    def __post_init__(self) -> None:
        self._begin(self.config, self.started)

    def reset(self, config: LoadTestConfig) -> None:
        """Start the run now, with this config (a worker's share of the whole one)."""
        self._begin(config, time.monotonic())

    def _begin(self, config: LoadTestConfig, now: float) -> None:
        self.config, self.started, self.taken = config, now, 0
        self.schedule = Schedule(config, now)
        self.count_tokens = load_token_counter(config.tokenizer) if config.tokenizer else None

    def take(self) -> tuple[float, Prompt] | None:
        """The next request and when it is due; at a trace's end the run stops."""
        taken = self.schedule.take(time.monotonic())
        if taken is None:
            self.stopping = True
        else:
            self.taken += 1
        return taken

    def unfinished(self, ended: float) -> list[RequestRecord]:
        """The requests a run that ended at `ended` cut off: still in flight (a user's entry goes as its request
        ends, before the record is kept), or finished after it."""
        return [*self.in_flight.values(), *(r for r in self.records if r.end > ended)]

    def full(self) -> bool:
        limit = self.config.max_requests
        return self.stopping or (limit is not None and self.taken >= limit)
