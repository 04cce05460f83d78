"""Quota maths with a clock passed in: token buckets, reservation and settlement, concurrency."""

from __future__ import annotations

import pytest

from deploykit.serve.accounting.keys import ApiKey
from deploykit.serve.gateway.errors import GatewayError
from deploykit.serve.gateway.ratelimit import Bucket, RateLimiter
from deploykit.serve.gateway.tokens import estimate_prompt_tokens


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(**limits: int) -> ApiKey:
    return ApiKey(id="k1", name="team", secret_sha256="x", **limits)  # type: ignore[arg-type]


def rejected(limiter: RateLimiter, api_key: ApiKey, tokens: int = 0) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        limiter.admit(api_key, tokens)
    assert info.value.status == 429
    return info.value


@pytest.mark.parametrize(
    ("per_minute", "level", "elapsed", "expected"),
    [
        (60, 0, 1.0, 1.0),  # one a second
        (60, 0, 120.0, 60.0),  # never past a minute's allowance
        (600, 10, 0.5, 15.0),
        (60, -30, 10.0, -20.0),  # a bucket settled below zero refills from there
    ],
)
def test_bucket_refills_continuously(per_minute: int, level: float, elapsed: float, expected: float) -> None:
    bucket = Bucket(per_minute, level, 0.0)
    bucket.refill(elapsed)
    assert bucket.level == pytest.approx(expected)


def test_bucket_says_how_long_to_wait() -> None:
    bucket = Bucket(60, 0.5, 0.0)
    assert bucket.wait_s(1) == pytest.approx(0.5)
    assert bucket.wait_s(0.5) == 0
    assert bucket.reset_s() == pytest.approx(59.5)


def test_requests_per_minute_admits_exactly_the_allowance_then_says_when_to_retry() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    k = key(rpm=3)
    for _ in range(3):
        limiter.finish(limiter.admit(k, 0), 0)
    error = rejected(limiter, k)
    assert error.type == "requests" and error.code == "rate_limit_exceeded"
    assert error.headers["Retry-After"] == "20"  # one request refills in 60/3 s
    assert error.headers["x-ratelimit-limit-requests"] == "3"
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    clock.now += 20
    limiter.admit(k, 0)


def test_tokens_are_reserved_then_settled_to_actual_use() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    k = key(tpm=1000)
    first = limiter.admit(k, 600)
    assert first.headers["x-ratelimit-remaining-tokens"] == "400"
    error = rejected(limiter, k, 600)
    assert error.type == "tokens"
    assert error.headers["Retry-After"] == "12"  # 200 tokens short at 1000/60 per second
    limiter.finish(first, 100)  # it used far less than it reserved
    assert limiter.admit(k, 600).headers["x-ratelimit-remaining-tokens"] == "300"


def test_using_more_than_reserved_leaves_the_bucket_below_zero() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    k = key(tpm=600)
    limiter.finish(limiter.admit(k, 100), 900)  # no max_tokens: the answer was long
    error = rejected(limiter, k, 10)
    assert error.headers["Retry-After"] == "31"  # back to 10 from -300 at 10/s


def test_a_request_larger_than_a_minutes_allowance_can_never_pass() -> None:
    error = rejected(RateLimiter(Clock()), key(tpm=100), 101)
    assert "Retry-After" not in error.headers
    assert "more than" in error.message


def test_concurrency_limit_counts_requests_in_flight() -> None:
    limiter = RateLimiter(Clock())
    k = key(max_concurrent=2)
    a, _ = limiter.admit(k, 0), limiter.admit(k, 0)
    assert rejected(limiter, k).type == "concurrent_requests"
    limiter.finish(a, 0)
    limiter.finish(a, 0)  # finishing twice releases once
    limiter.admit(k, 0)
    rejected(limiter, k)


def test_a_rejected_request_takes_nothing_from_any_limit() -> None:
    limiter = RateLimiter(Clock())
    k = key(rpm=10, tpm=100)
    limiter.admit(k, 90)
    rejected(limiter, k, 50)  # tokens short; the request allowance must stay untouched
    assert limiter.admit(k, 10).headers["x-ratelimit-remaining-requests"] == "8"


def test_prompt_estimate_is_a_quarter_of_the_body_rounded_up() -> None:
    assert estimate_prompt_tokens(0) == 0
    assert estimate_prompt_tokens(401) == 101
