"""Per-key quotas: requests per minute, tokens per minute, seconds of audio per minute and concurrent requests.

Each per-minute limit is a token bucket that holds a minute's allowance and refills continuously. A
request reserves its prompt estimate plus max_tokens before it is forwarded and is settled to the
tokens it really used when it ends, so a bucket can go below zero and later requests wait for it.
Admission checks every limit before taking from any, in one synchronous step on the event loop: two
concurrent requests can never both take the last unit (no over-admission).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from deploykit.serve.accounting.keys import ApiKey
from deploykit.serve.gateway.errors import GatewayError


@dataclass
class Bucket:
    """A minute's allowance of `per_minute`, refilled continuously."""

    per_minute: int
    level: float
    updated: float

    def refill(self, now: float) -> None:
        self.level = min(self.per_minute, self.level + (now - self.updated) * self.per_minute / 60)
        self.updated = now

    def wait_s(self, amount: float) -> float:
        """Seconds until `amount` can be taken (0 when it can be now)."""
        return max(0.0, (amount - self.level) * 60 / self.per_minute)

    def reset_s(self) -> float:
        """Seconds until the bucket is full again."""
        return max(0.0, (self.per_minute - self.level) * 60 / self.per_minute)


@dataclass
class KeyState:
    requests: Bucket | None
    tokens: Bucket | None
    in_flight: int = 0
    audio: Bucket | None = None  # seconds of audio

    def refill(self, now: float) -> KeyState:
        for bucket in (self.requests, self.tokens, self.audio):
            if bucket is not None:
                bucket.refill(now)
        return self


@dataclass
class Admission:
    """One admitted request's hold on its key's quotas, until `RateLimiter.finish`."""

    key_id: str
    reserved_tokens: int
    headers: dict[str, str] = field(default_factory=dict)
    finished: bool = False
    lease: str | None = None  # its row in quota_leases, when the quotas are shared (SharedRateLimiter)
    reserved_audio_s: float = 0.0


class RateLimiter:
    """The quotas of the keys this gateway process admits (see SharedRateLimiter for several processes)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._state: dict[str, KeyState] = {}

    def admit(self, key: ApiKey, tokens: int, audio_s: float = 0.0) -> Admission:
        """Take one request, `tokens` and `audio_s` seconds of audio from the key's quotas, or raise the 429 that
        says when to retry."""
        return take(self._state_of(key, self._clock()), key, tokens, audio_s)

    def finish(self, admission: Admission, used_tokens: int | None, used_audio_s: float | None = None) -> None:
        """Release the request's concurrency slot and settle its tokens and audio to what it used (None: as
        reserved)."""
        if admission.finished:
            return
        admission.finished = True
        state = self._state.get(admission.key_id)
        if state is None:
            return
        state.in_flight -= 1
        settle(state, admission, used_tokens, self._clock(), used_audio_s)

    def _state_of(self, key: ApiKey, now: float) -> KeyState:
        state = self._state.get(key.id)
        if state is None:
            state = new_state(key, now)
            self._state[key.id] = state
        return state.refill(now)


def new_state(key: ApiKey, now: float) -> KeyState:
    """A key's quotas, full."""
    return KeyState(bucket(key.rpm, None, now), bucket(key.tpm, None, now), audio=bucket(key.audio_spm, None, now))


def bucket(per_minute: int | None, level: float | None, updated: float) -> Bucket | None:
    """The bucket of a limit (None when the key has no such limit) at `level`, or full when it has none yet."""
    return Bucket(per_minute, per_minute if level is None else level, updated) if per_minute else None


def take(state: KeyState, key: ApiKey, tokens: int, audio_s: float = 0.0) -> Admission:
    """Admit one request of `tokens` (and `audio_s` seconds of audio) against `state` (refilled to now), or
    raise its 429. Every limit is checked before any is taken from."""
    if key.max_concurrent is not None and state.in_flight >= key.max_concurrent:
        raise _limited(
            f"The API key '{key.name}' has {state.in_flight} requests in flight, its limit.",
            "concurrent_requests",
            1.0,
            _headers(state),
        )
    limits = (
        (state.requests, 1, "requests"),
        (state.tokens, tokens, "tokens"),
        (state.audio, audio_s, "audio_seconds"),
    )
    for limit, amount, what in limits[1:]:
        if limit is not None and amount > limit.per_minute:  # it would never fit: no use waiting
            message = _TOO_MUCH[what].format(amount, key.name, limit.per_minute)
            raise GatewayError(429, message, what, "rate_limit_exceeded", headers=_headers(state))
    for limit, amount, what in limits:
        if limit is not None and limit.wait_s(amount) > 0:
            raise _limited(
                f"Rate limit reached for the API key '{key.name}': {limit.per_minute} {what} per minute.",
                what,
                limit.wait_s(amount),
                _headers(state),
            )
    for limit, amount, _ in limits:
        if limit is not None:
            limit.level -= amount
    state.in_flight += 1
    return Admission(key.id, tokens, _headers(state), reserved_audio_s=audio_s)


# What a request more than a minute's allowance is told (its amount, the key's name, the limit).
_TOO_MUCH = {
    "tokens": "This request needs about {0} tokens, more than the API key '{1}' may use in a minute ({2}); set a "
    "lower max_tokens or shorten the prompt.",
    "audio_seconds": "This audio is about {0:.0f} s long, more than the API key '{1}' may have transcribed in a "
    "minute ({2} s); send it in shorter parts.",
}


def settle(
    state: KeyState, admission: Admission, used_tokens: int | None, now: float, used_audio_s: float | None = None
) -> None:
    """Give back (or take) the difference between the tokens (and audio) reserved and those used."""
    for bucket, reserved, used in (
        (state.tokens, admission.reserved_tokens, used_tokens),
        (state.audio, admission.reserved_audio_s, used_audio_s),
    ):
        if bucket is not None and used is not None:
            bucket.refill(now)
            bucket.level = min(bucket.per_minute, bucket.level + reserved - used)


def _limited(message: str, what: str, retry_after_s: float, headers: dict[str, str]) -> GatewayError:
    return GatewayError(
        429,
        message,
        what,
        "rate_limit_exceeded",
        headers={**headers, "Retry-After": str(max(1, math.ceil(retry_after_s)))},
    )


def _headers(state: KeyState) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for whichever limits the key has."""
    headers = {}
    for bucket, what in ((state.requests, "requests"), (state.tokens, "tokens"), (state.audio, "audio-seconds")):
        if bucket is not None:
            headers[f"x-ratelimit-limit-{what}"] = str(bucket.per_minute)
            headers[f"x-ratelimit-remaining-{what}"] = str(max(0, math.floor(bucket.level)))
            headers[f"x-ratelimit-reset-{what}"] = f"{bucket.reset_s():.3g}s"
    return headers
