"""What one request did, timed with a monotonic clock, and what can be derived from it alone."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

# Error classes, in the order a request can fail.
ERROR_CLASSES = ("connect", "timeout", "429", "4xx", "5xx", "cut")


@dataclass
class RequestRecord:
    """Times are time.monotonic() seconds. `events` holds (arrival, tokens) for each SSE event that
    carried content (a role-only first chunk does not count)."""

    scheduled: float  # when the request was due: the open-loop schedule, or the send time in a closed loop
    sent: float
    end: float
    status: int | None = None
    error: str | None = None  # one of ERROR_CLASSES, or None
    retry_after: float | None = None
    headers_at: float | None = None
    events: list[tuple[float, int]] = field(default_factory=list)
    output_tokens: int = 0
    input_tokens: int = 0
    usage_reported: bool = False  # False: tokens were counted from the stream, not reported by the server
    # server (running usage: each event's tokens) | server total, spread by text | server total, spread by
    # tokenizer (the final usage over the events) | tokenizer | events (one token per event, the last resort)
    counted_by: str = "server"
    reasoning: bool = False  # some output was a reasoning model's thinking (reasoning_content)
    first_answer: float | None = None  # when the first answer token (after any thinking) arrived
    response_id: str | None = None  # the server's id for the answer ("id" of its chunks): to match its logs

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.events[0][0] - self.sent if self.events else None

    @property
    def ttft_from_schedule(self) -> float | None:
        return self.events[0][0] - self.scheduled if self.events else None

    @property
    def ttft_answer(self) -> float | None:
        """For a reasoning model: the time to the first token of the answer, after its thinking."""
        return self.first_answer - self.sent if self.reasoning and self.first_answer is not None else None

    @property
    def e2e(self) -> float:
        return self.end - self.sent

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (last token - first token) / (output tokens - 1)."""
        if len(self.events) < 2 or self.output_tokens < 2:
            return None
        return (self.events[-1][0] - self.events[0][0]) / (self.output_tokens - 1)

    def itl(self) -> list[float]:
        return per_token_gaps(self.events)

    def chunk_gaps(self) -> list[float]:
        return [t - prev for (prev, _), (t, _) in zip(self.events, self.events[1:], strict=False)]

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    def shift(self, seconds: float) -> None:
        """Move every time by `seconds`: onto another process's monotonic clock (a worker on another host)."""
        self.scheduled, self.sent, self.end = self.scheduled + seconds, self.sent + seconds, self.end + seconds
        self.headers_at = None if self.headers_at is None else self.headers_at + seconds
        self.first_answer = None if self.first_answer is None else self.first_answer + seconds
        self.events = [(t + seconds, k) for t, k in self.events]


def per_token_gaps(events: Sequence[tuple[float, int]]) -> list[float]:
    """Per-token inter-token latencies: an event carrying k tokens spreads its gap over k tokens."""
    out: list[float] = []
    for (prev, _), (t, k) in itertools.pairwise(events):
        out += [(t - prev) / k] * k if k > 0 else []
    return out
