"""The demand a deployment must serve: a request rate (or tokens a day), request lengths and latency
objectives. (A load test's workload, loadtests/workload.py, is what it sends; this is what must be met.)"""

from __future__ import annotations

from dataclasses import dataclass

from deploykit.core.errors import UsageError
from deploykit.core.slo import Slo, parse_slos

HOURS_PER_MONTH = 730


@dataclass(frozen=True)
class TargetLoad:
    rps: float  # mean arrival rate, requests per second
    input_tokens: int
    output_tokens: int
    slos: tuple[Slo, ...] = ()

    @classmethod
    def parse(
        cls, rps: float | None, tokens_per_day: float | None, input_tokens: int, output_tokens: int, slo: str = ""
    ) -> TargetLoad:
        """The load as the user gives it: exactly one of a request rate or tokens a day, lengths, SLOs."""
        if (rps is None) == (tokens_per_day is None):
            raise UsageError("Give the load as exactly one of --rps or --tokens-per-day.", "For example --rps 5.")
        if input_tokens < 1 or output_tokens < 1:
            raise UsageError("--input-tokens and --output-tokens must be at least 1.")
        slos = tuple(parse_slos(slo))
        if rps is not None:
            return cls(rps, input_tokens, output_tokens, slos)
        assert tokens_per_day is not None
        return cls(
            cls.from_tokens_per_day(tokens_per_day, input_tokens, output_tokens).rps, input_tokens, output_tokens, slos
        )

    @classmethod
    def from_tokens_per_day(cls, tokens_per_day: float, input_tokens: int, output_tokens: int) -> TargetLoad:
        return cls(tokens_per_day / 86_400 / (input_tokens + output_tokens), input_tokens, output_tokens)

    def limit(self, metric: str) -> float | None:
        limits = [s.limit for s in self.slos if s.metric == metric]
        return min(limits) if limits else None

    @property
    def tokens_per_month(self) -> tuple[float, float]:
        """(prompt, completion) tokens a month at this rate."""
        requests = self.rps * 3600 * HOURS_PER_MONTH
        return requests * self.input_tokens, requests * self.output_tokens
