"""When each request of a run is sent, and what it asks: a closed loop sends at once; an open loop follows
one schedule for the whole run, of Poisson or gamma (bursty) arrivals at a rate, or of a trace's own
arrivals and lengths. No locust here, so the schedule is tested in-process."""

from __future__ import annotations

import random
from pathlib import Path

from deploykit.loadtests.config import LoadTestConfig
from deploykit.loadtests.traces import read_trace
from deploykit.loadtests.workload import Prompt


class Schedule:
    def __init__(self, config: LoadTestConfig, start: float) -> None:
        self.config, self.start, self.next_arrival = config, start, start
        self.random = random.Random(config.seed)
        self.workload = config.workload()
        k, n = config.trace_part
        self.trace = read_trace(Path(config.trace)).arrivals[k::n] if config.trace else None
        self.taken = 0

    def take(self, now: float) -> tuple[float, Prompt] | None:
        """The next request and its scheduled send time (`now` in a closed loop); None when a trace has been
        replayed to its end."""
        cfg = self.config
        if self.trace is not None:
            if self.taken == len(self.trace):
                return None
            arrival = self.trace[self.taken]
            self.taken += 1
            prompt = self.workload.sized(arrival.input_tokens, arrival.output_tokens)
            return self.start + arrival.at / cfg.trace_speed, prompt
        if cfg.rate is None:
            return now, self.workload.next()
        due = self.next_arrival
        if cfg.burstiness == 1:
            self.next_arrival += self.random.expovariate(cfg.rate)
        else:  # gamma gaps of the same mean, 1 / rate, and a coefficient of variation of 1 / sqrt(burstiness)
            self.next_arrival += self.random.gammavariate(cfg.burstiness, 1 / (cfg.rate * cfg.burstiness))
        return due, self.workload.next()
