"""Quotas kept in the database (SharedRateLimiter), here on one SQLite file opened by two connections as two
gateway processes would: the same answers as the in-process limiter (a second implementation to agree with),
no over-admission when both admit at once, slots held by leases that a dead gateway's expire, and tokens
settled to what was used. tests/integration/test_postgres.py runs two gateway processes on PostgreSQL."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from deploykit.serve.accounting.database import Database, Row, Run, connect
from deploykit.serve.accounting.keys import ApiKey, create_key, list_keys
from deploykit.serve.gateway.errors import GatewayError
from deploykit.serve.gateway.ratelimit import Admission, RateLimiter
from deploykit.serve.gateway.shared_limits import SharedRateLimiter

T = TypeVar("T")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Database, Database]]:
    url = f"sqlite:///{tmp_path / 'deploykit.db'}"
    a, b = connect(url), connect(url)
    yield a, b
    a.close()
    b.close()


class Slow:
    """A database whose statements take 2 ms each (and let other threads run meanwhile): a transaction that
    did not keep other writers out would interleave with them."""

    def __init__(self, db: Database) -> None:
        self.db, self.url = db, db.url

    def exclusive(self, work: Callable[[Run], T]) -> T:
        def slow(run: Run) -> T:
            def each(sql: str, params: Sequence[Any] = ()) -> list[Row]:
                rows = run(sql, params)
                time.sleep(0.002)
                return rows

            return work(each)

        return self.db.exclusive(slow)


def _key(db: Database, **limits: int) -> ApiKey:
    create_key(db, "team", **limits)  # type: ignore[arg-type]
    [key] = list_keys(db)
    return key


def _outcome(limiter: RateLimiter | SharedRateLimiter, key: ApiKey, tokens: int) -> tuple[object, ...]:
    try:
        admission = limiter.admit(key, tokens)
    except GatewayError as e:
        return (e.status, e.type, str(e), dict(e.headers or {}))
    return (200, admission.reserved_tokens, admission.headers, admission)


def test_the_shared_limiter_answers_as_the_in_process_one(two: tuple[Database, Database]) -> None:
    """The same steps against both: admissions (status, the error and its headers, or what was reserved) and
    requests ending with fewer tokens used than reserved, with time passing between some."""
    db, _ = two
    key = _key(db, rpm=5, tpm=300, max_concurrent=3)
    clock = Clock()
    local, shared = RateLimiter(clock), SharedRateLimiter(db, clock=clock)
    held: list[tuple[Admission, Admission]] = []
    steps: list[tuple[str, int, float]] = [
        ("admit", 100, 0), ("admit", 100, 0), ("admit", 150, 0), ("admit", 50, 0), ("end", 20, 0),
        ("admit", 50, 1), ("admit", 400, 0), ("end", 0, 0), ("admit", 10, 30), ("admit", 10, 0), ("admit", 10, 0),
    ]  # fmt: skip
    for step, tokens, wait in steps:
        clock.now += wait
        if step == "end":
            mine, theirs = held.pop(0)
            local.finish(mine, tokens)
            shared.finish(theirs, tokens)
            shared.flush()
            continue
        mine_out, their_out = _outcome(local, key, tokens), _outcome(shared, key, tokens)
        assert mine_out[:3] == their_out[:3] and len(mine_out) == len(their_out), (step, tokens, clock.now)
        if mine_out[0] == 200:
            held.append((mine_out[-1], their_out[-1]))  # type: ignore[arg-type]
    assert len(held) >= 1
    shared.close()


def test_two_gateways_never_admit_past_the_limit_together(two: tuple[Database, Database]) -> None:
    a, b = two
    key = _key(a, rpm=10)
    clock = Clock()  # no refill during the test: exactly ten may pass
    limiters = [SharedRateLimiter(Slow(a), clock=clock), SharedRateLimiter(Slow(b), clock=clock)]  # type: ignore[arg-type]
    admitted: list[int] = []

    def hammer(i: int) -> None:
        for n in range(8):
            try:
                limiters[(i + n) % 2].admit(key, 1)
                admitted.append((i + n) % 2)
            except GatewayError as e:
                assert e.status == 429 and e.type == "requests"

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 10 and set(admitted) == {0, 1}  # both gateways admitted some
    for limiter in limiters:
        limiter.close()


def test_concurrency_slots_are_leases_and_a_dead_gateway_s_expire(two: tuple[Database, Database]) -> None:
    a, b = two
    key = _key(a, max_concurrent=2)
    clock = Clock()
    first, second = SharedRateLimiter(a, lease_s=60, clock=clock), SharedRateLimiter(b, lease_s=60, clock=clock)
    held = first.admit(key, 1)
    first.admit(key, 1)  # this one's gateway dies: never finished
    with pytest.raises(GatewayError, match="has 2 requests in flight, its limit"):
        second.admit(key, 1)
    first.finish(held, 1)
    first.close()  # settled
    second.finish(second.admit(key, 1), 1)  # the slot came back across gateways
    second.close()
    third = SharedRateLimiter(b, lease_s=60, clock=clock)
    third.admit(key, 1)
    with pytest.raises(GatewayError, match="has 2 requests in flight"):
        third.admit(key, 1)
    clock.now += 61  # the dead gateway's lease and this one's have expired
    third.admit(key, 1)
    third.admit(key, 1)
    third.close()


def test_tokens_are_settled_to_what_was_used(two: tuple[Database, Database]) -> None:
    a, b = two
    key = _key(a, tpm=100)
    clock = Clock()
    first, second = SharedRateLimiter(a, clock=clock), SharedRateLimiter(b, clock=clock)
    admission = first.admit(key, 60)  # 40 left
    with pytest.raises(GatewayError, match="100 tokens per minute"):
        second.admit(key, 80)
    first.finish(admission, 10)  # used 10 of the 60: 50 come back, 90 left
    first.close()
    assert second.admit(key, 80).reserved_tokens == 80
    with pytest.raises(GatewayError, match="100 tokens per minute"):
        second.admit(key, 20)  # 10 left
    second.close()


def test_a_settle_that_fails_is_logged_and_the_next_ones_still_run(
    two: tuple[Database, Database], caplog: pytest.LogCaptureFixture
) -> None:
    a, _ = two
    key = _key(a, max_concurrent=2)

    class Flaky(Slow):
        fail = False

        def exclusive(self, work: Callable[[Run], T]) -> T:
            if Flaky.fail:
                Flaky.fail = False
                raise sqlite3.OperationalError("database is locked")
            return self.db.exclusive(work)

    limiter = SharedRateLimiter(Flaky(a), clock=Clock())  # type: ignore[arg-type]
    first, second = limiter.admit(key, 1), limiter.admit(key, 1)
    Flaky.fail = True
    limiter.finish(first, 1)  # its settle fails: its slot stays taken until its lease expires
    limiter.finish(second, 1)  # the writer goes on: this one is settled
    limiter.flush()
    assert "could not settle a request's quota" in caplog.text
    limiter.admit(key, 1)
    with pytest.raises(GatewayError, match="has 2 requests in flight"):
        limiter.admit(key, 1)
    limiter.close()


def test_a_lease_lasts_fifteen_minutes_by_default(two: tuple[Database, Database]) -> None:
    a, _ = two
    key = _key(a, max_concurrent=1)
    clock = Clock()
    limiter = SharedRateLimiter(a, clock=clock)
    limiter.admit(key, 1)  # never finished: its gateway died
    clock.now += 899
    with pytest.raises(GatewayError, match="has 1 requests in flight"):
        limiter.admit(key, 1)
    clock.now += 2
    limiter.admit(key, 1)
    limiter.close()


def test_a_request_finished_twice_gives_its_tokens_back_once(two: tuple[Database, Database]) -> None:
    a, _ = two
    key = _key(a, tpm=100)
    limiter = SharedRateLimiter(a, clock=Clock())
    admission = limiter.admit(key, 60)  # 40 left
    limiter.finish(admission, 10)  # 50 back: 90
    limiter.finish(admission, 10)  # the relay and the disconnect handler may both end it: nothing more
    limiter.flush()
    assert limiter.admit(key, 90).reserved_tokens == 90
    with pytest.raises(GatewayError, match="100 tokens per minute"):
        limiter.admit(key, 1)
    limiter.close()


def test_a_gateway_that_exits_without_closing_its_limiter_still_exits(tmp_path: Path) -> None:
    # the settling thread must not keep a crashed gateway's process alive
    script = (
        "import sys\n"
        "from deploykit.serve.accounting.database import connect\n"
        "from deploykit.serve.gateway.shared_limits import SharedRateLimiter\n"
        "SharedRateLimiter(connect(sys.argv[1]))\n"
    )
    url = f"sqlite:///{tmp_path / 'deploykit.db'}"
    done = subprocess.run([sys.executable, "-c", script, url], timeout=20, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
