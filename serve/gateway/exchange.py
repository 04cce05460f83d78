"""The accounting of one request through the gateway: what it used, how fast it was, and where it is recorded.

An Exchange watches the answer go by (each SSE event of a stream, or the whole JSON body), learns the
token usage and the time to first content, and on `finish` settles the key's quota, writes the ledger
row and updates the metrics, once, whichever way the request ended.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

from deploykit.serve.accounting.budgets import BudgetKeeper, Hold, Price
from deploykit.serve.accounting.keys import ApiKey
from deploykit.serve.accounting.ledger import Ledger, UsageRecord, Work
from deploykit.serve.gateway.fairness import Slot
from deploykit.serve.gateway.metrics import GatewayMetrics
from deploykit.serve.gateway.ratelimit import Admission, RateLimiter
from deploykit.serve.gateway.routing import Model
from deploykit.serve.gateway.shared_limits import SharedRateLimiter
from deploykit.serve.gateway.spill import SpillTarget
from deploykit.serve.gateway.tracing import Tracer

# An SSE event that carries generated text (a role-only first chunk has "content":"" and does not count).
_CONTENT = re.compile(rb'"(?:content|text)":\s*"[^"]')
_USAGE = re.compile(rb'"usage":\s*\{')
DONE_EVENT = b"data: [DONE]"


@dataclass
class Exchange:
    ledger: Ledger
    metrics: GatewayMetrics
    limiter: RateLimiter | SharedRateLimiter
    endpoint: str
    model: str  # as the ledger records it: the model served, or what a rejected request asked for
    key: ApiKey | None = None
    admission: Admission | None = None
    replica: str | None = None
    strip_usage: bool = False  # the gateway asked for the usage chunk; the client did not
    route: Model | None = None  # the local model, whose recent TTFT this answer updates
    spill: SpillTarget | None = None  # set when the request went to the managed endpoint
    at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    content_events: int = 0
    first_content: float | None = None
    last_content: float | None = None
    finished: bool = False
    label: str = ""  # the metrics' model label: a served name or "unknown", never what a client made up
    slot: Slot | None = None  # its place under the gateway's concurrency cap, if there is one
    tracer: Tracer | None = None  # OpenTelemetry spans when the request ends (tracing.py), if exporting
    arrived: float | None = None  # time.monotonic() as the request came in (before its body, key and quota)
    queued: float | None = None  # when it got its slot under the concurrency cap
    traceparent: str | None = None  # the client's W3C trace context, which its span joins (when tracing)
    price: Price | None = None  # what the local model's tokens cost (serve --token-price), if set
    hold: Hold | None = None  # its worst case held against its key's spend budget, settled with its ledger row
    budgets: BudgetKeeper | None = field(default=None, repr=False)
    audio_seconds: float | None = None  # a transcription's audio: estimated from the upload, then the engine's count

    def __post_init__(self) -> None:
        self.label = self.label or self.model
        self._in_flight = self.metrics.in_flight.labels(self.label)
        self._itl = self.metrics.itl.labels(self.label)  # looked up once: observe_event runs per event
        self._in_flight.inc()

    @property
    def key_label(self) -> str:
        return self.key.name if self.key is not None else ""

    def observe_event(self, event: bytes) -> bool:
        """Account for one SSE event (without its blank-line end); False when it must not reach the client."""
        if _CONTENT.search(event):
            now = time.monotonic()
            if self.first_content is None:
                self.first_content = now
            elif self.last_content is not None:
                self._itl.observe(now - self.last_content)
            self.last_content = now
            self.content_events += 1
        if _USAGE.search(event) and event.startswith(b"data: "):
            try:
                chunk = json.loads(event[6:])
            except ValueError:
                return True
            self.observe_usage(chunk.get("usage"))
            if self.strip_usage and not chunk.get("choices"):
                return False
        return True

    def observe_body(self, content: bytes) -> None:
        """Account for a whole JSON answer."""
        try:
            body = json.loads(content)
        except (ValueError, RecursionError):
            return
        if isinstance(body, dict):
            self.observe_usage(body.get("usage"))

    def observe_usage(self, usage: object) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens = _int(usage.get("prompt_tokens"), self.prompt_tokens)
            self.completion_tokens = _int(usage.get("completion_tokens"), self.completion_tokens)
            seconds = usage.get("seconds")  # a transcription's: {"type": "duration", "seconds": N}
            if usage.get("type") == "duration" and isinstance(seconds, int | float) and not isinstance(seconds, bool):
                self.audio_seconds = float(seconds)

    async def finish(self, status: int, error: str | None = None) -> None:
        """Settle and record the request, returning once its ledger row is committed."""
        record = self._close(status, error)
        if record is not None:
            ended = time.monotonic()
            await self.ledger.record(record, self._settlement(record))
            if self.tracer is not None:
                self.tracer.record(self, status, error, ended, time.monotonic())

    def finish_nowait(self, status: int, error: str | None = None) -> None:
        """Settle and record a request whose client has gone (nobody waits for the row)."""
        record = self._close(status, error)
        if record is not None:
            self.ledger.record_nowait(record, self._settlement(record))
            if self.tracer is not None:
                self.tracer.record(self, status, error, time.monotonic(), None)

    def _settlement(self, record: UsageRecord) -> Work | None:
        if self.hold is None or self.budgets is None:
            return None
        return self.budgets.settlement(self.hold, record.cost_usd or 0.0)

    def _close(self, status: int, error: str | None) -> UsageRecord | None:
        if self.finished:
            return None
        self.finished = True
        duration = time.monotonic() - self.started
        prompt = self.prompt_tokens or 0
        # without the engine's usage (a stream cut short), each content event is counted as one token
        completion = self.completion_tokens if self.completion_tokens is not None else self.content_events
        used = prompt + completion if self.prompt_tokens is not None else None
        if self.admission is not None:
            self.limiter.finish(self.admission, used, self.audio_seconds)
        if self.slot is not None:
            self.slot.release()
        m, key = self.metrics, self.key_label
        self._in_flight.dec()
        m.requests.labels(self.label, key, str(status)).inc()
        m.tokens.labels(self.label, key, "prompt").inc(prompt)
        m.tokens.labels(self.label, key, "completion").inc(completion)
        m.duration.labels(self.label).observe(duration)
        ttft = None if self.first_content is None else self.first_content - self.started
        if ttft is not None:
            m.ttft.labels(self.label).observe(ttft)
            if self.route is not None and self.spill is None:
                self.route.observe_ttft(ttft)
        price = self.spill.price if self.spill is not None else self.price
        if self.audio_seconds is not None:
            m.audio.labels(self.label, key).inc(self.audio_seconds)
        cost = None if price is None else price.cost(prompt, completion)
        if cost is not None:
            m.spend.labels(self.label, key).inc(cost)
        return UsageRecord(
            at=self.at,
            key_id=self.key.id if self.key is not None else None,
            model=self.model,
            endpoint=self.endpoint,
            status=status,
            prompt_tokens=prompt,
            completion_tokens=completion,
            ttft_ms=None if ttft is None else ttft * 1000,
            duration_ms=duration * 1000,
            replica=self.replica,
            error=error,
            cost_usd=cost,
            audio_seconds=self.audio_seconds,
        )


def _int(value: object, default: int | None) -> int | None:
    return value if isinstance(value, int) else default
