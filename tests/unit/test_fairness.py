"""The gateway-wide concurrency cap: who gets a freed slot, how long a request may wait, and, through the
gateway in front of a slow engine, that one key flooding it cannot keep another key waiting behind it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from fastapi import FastAPI

from deploykit.serve.accounting.database import Database
from deploykit.serve.accounting.keys import create_key
from deploykit.serve.gateway import Backend, create_app
from deploykit.serve.gateway.app import GatewayOptions
from deploykit.serve.gateway.errors import GatewayError
from deploykit.serve.gateway.fairness import FairQueue
from deploykit.serve.gateway.proxy import engine_session
from tests.unit.gateway_support import assert_openai_error, chat, client_of

pytestmark = pytest.mark.anyio


async def test_a_freed_slot_goes_to_the_waiting_key_with_the_fewest_in_flight() -> None:
    queue = FairQueue(2)
    a1, a2 = await queue.acquire("a"), await queue.acquire("a")
    order: list[str] = []

    async def wait(key: str) -> None:
        slot = await queue.acquire(key)
        order.append(key)
        slot.release()

    waiters = [asyncio.create_task(wait(k)) for k in ("a", "a", "a", "b")]
    await asyncio.sleep(0)
    assert queue.queued == 4 and queue.in_flight == {"a": 2}
    a1.release()  # "b" has none in flight: it goes before the three "a" that queued earlier
    await asyncio.gather(*waiters)  # each hands the freed slot on as it ends
    assert order == ["b", "a", "a", "a"] and queue.in_flight == {"a": 1}
    a2.release()
    assert queue.total == 0 and queue.in_flight == {}


async def test_among_equals_the_longest_waiting_goes_first() -> None:
    queue = FairQueue(1)
    held = await queue.acquire("x")
    order: list[str] = []

    async def wait(key: str) -> None:
        (await queue.acquire(key)).release()
        order.append(key)

    tasks = []
    for key in ("c", "a", "b"):
        tasks.append(asyncio.create_task(wait(key)))
        await asyncio.sleep(0)
    held.release()
    await asyncio.gather(*tasks)
    assert order == ["c", "a", "b"]


async def test_a_request_that_waits_too_long_gets_a_503_with_retry_after() -> None:
    queue = FairQueue(1, max_wait_s=0.05)
    await queue.acquire("a")
    with pytest.raises(GatewayError) as e:
        await queue.acquire("b")
    assert (e.value.status, e.value.code) == (503, "overloaded") and "Retry-After" in e.value.headers
    assert queue.queued == 0


async def test_a_full_queue_refuses_at_once() -> None:
    queue = FairQueue(1, max_waiting=1)
    await queue.acquire("a")
    waiting = asyncio.create_task(queue.acquire("a"))
    await asyncio.sleep(0)
    started = time.monotonic()
    with pytest.raises(GatewayError, match="already waiting"):
        await queue.acquire("b")
    assert time.monotonic() - started < 0.01
    waiting.cancel()


async def test_a_client_that_leaves_while_waiting_gives_its_place_up() -> None:
    queue = FairQueue(1)
    held = await queue.acquire("a")
    gone = asyncio.create_task(queue.acquire("b"))
    await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert queue.queued == 0
    held.release()
    assert queue.total == 0
    (await queue.acquire("c")).release()


async def test_releasing_twice_frees_one_slot() -> None:
    queue = FairQueue(2)
    slot = await queue.acquire("a")
    await queue.acquire("b")
    slot.release()
    slot.release()
    assert queue.total == 1 and queue.in_flight == {"b": 1}


async def test_tiers_go_first_in_order_whatever_their_keys_have_in_flight() -> None:
    queue = FairQueue(1)
    held = await queue.acquire("h", "high")
    order: list[str] = []

    async def wait(key: str, tier: str) -> None:
        (await queue.acquire(key, tier)).release()
        order.append(key)

    tasks = []
    for key, tier in (("b1", "batch"), ("n1", "normal"), ("b2", "batch"), ("h2", "high"), ("n2", "normal")):
        tasks.append(asyncio.create_task(wait(key, tier)))
        await asyncio.sleep(0)
    held.release()
    await asyncio.gather(*tasks)
    assert order == ["h2", "n1", "n2", "b1", "b2"]


async def test_batch_leaves_a_quarter_of_the_slots_to_the_interactive_tiers() -> None:
    queue = FairQueue(4)
    assert queue.batch_limit == 3
    batch = [await queue.acquire("b", "batch") for _ in range(3)]
    fourth = asyncio.create_task(queue.acquire("b", "batch"))
    await asyncio.sleep(0)
    assert queue.total == 3 and queue.queued == 1  # the fourth batch request waits with a slot free...
    started = time.monotonic()
    interactive = await queue.acquire("n")  # ...which a normal request takes at once
    assert time.monotonic() - started < 0.01 and queue.total == 4
    interactive.release()
    assert queue.queued == 1  # the free slot is still not batch's
    batch[0].release()
    (await fourth).release()  # a batch slot freed: the waiting batch request runs
    assert FairQueue(1).batch_limit == 1  # one slot: batch may use it (nothing would run otherwise)


async def test_a_full_queue_sheds_the_newest_batch_request_for_a_better_tier() -> None:
    queue = FairQueue(1, max_waiting=2, max_wait_s=5)
    held = await queue.acquire("n")
    old, new = (asyncio.create_task(queue.acquire(k, "batch")) for k in ("b1", "b2"))
    await asyncio.sleep(0)
    high = asyncio.create_task(queue.acquire("h", "high"))
    await asyncio.sleep(0)
    with pytest.raises(GatewayError) as shed:
        await new
    assert (shed.value.status, shed.value.type, shed.value.code) == (429, "priority", "overloaded")
    assert "higher-priority" in shed.value.message and shed.value.headers["Retry-After"] == "5"
    assert not old.done() and queue.queued == 2
    started = time.monotonic()
    with pytest.raises(GatewayError) as refused:  # a batch newcomer finds no worse tier: refused at once, 429
        await queue.acquire("b3", "batch")
    assert refused.value.status == 429 and "2 requests are already waiting" in refused.value.message
    assert time.monotonic() - started < 0.01
    normal = asyncio.create_task(queue.acquire("n2", "normal"))  # a normal one sheds the last batch request
    await asyncio.sleep(0)
    with pytest.raises(GatewayError):
        await old
    order: list[str] = []
    for task, name in ((high, "high"), (normal, "normal")):
        task.add_done_callback(lambda _, name=name: order.append(name))
    held.release()
    (await high).release()
    (await normal).release()
    assert order == ["high", "normal"] and queue.total == 0 and queue.queued == 0


@pytest.fixture
async def slow_backend(slow_engine_url: str) -> AsyncIterator[Backend]:
    async with engine_session() as session:
        yield Backend("m1", slow_engine_url, session, status="ready")


async def test_one_key_flooding_the_gateway_does_not_keep_another_waiting(slow_backend: Backend, db: Database) -> None:
    """2 slots; key a sends 8 requests of 0.4 s at once, key b one request just after: b runs as soon as one
    of a's ends, not after all of them (first come, first served would put it behind six)."""
    _, flood = create_key(db, "flood")
    _, polite = create_key(db, "polite")
    app: FastAPI = create_app([slow_backend], db, GatewayOptions(auth=True, max_concurrent=2))
    ended: dict[str, list[float]] = {"flood": [], "polite": []}

    async def ask(token: str, who: str) -> None:
        async with client_of(app, authorization=f"Bearer {token}") as client:
            response = await client.post("/v1/chat/completions", json=chat(max_tokens=20), timeout=30)
        assert response.status_code == 200, response.text
        ended[who].append(time.monotonic())

    floods = [asyncio.create_task(ask(flood, "flood")) for _ in range(8)]
    await asyncio.sleep(0.1)
    await ask(polite, "polite")
    await asyncio.gather(*floods)
    app.state.gateway.close()
    polite_end = ended["polite"][0]
    assert sum(end < polite_end for end in ended["flood"]) <= 3, ended
    assert app.state.gateway.queue.total == 0


async def test_over_the_queue_time_a_request_is_a_503_in_the_ledger(slow_backend: Backend, db: Database) -> None:
    app: FastAPI = create_app([slow_backend], db, GatewayOptions(max_concurrent=1, queue_timeout_s=0.1))
    async with client_of(app) as client:
        long = asyncio.create_task(client.post("/v1/chat/completions", json=chat(max_tokens=20)))
        await asyncio.sleep(0.05)
        refused = await client.post("/v1/chat/completions", json=chat(max_tokens=1))
        assert (await long).status_code == 200
        metrics = (await client.get("/metrics")).text
    assert_openai_error(refused, 503, "overloaded")
    assert "deploykit_queued_requests 0.0" in metrics
    app.state.gateway.close()
    assert sorted(status for (status,) in db.query("SELECT status FROM requests")) == [200, 503]


async def test_without_a_cap_nothing_waits(gateway: httpx.AsyncClient, app: FastAPI) -> None:
    assert app.state.gateway.queue is None
    results = await asyncio.gather(*(gateway.post("/v1/chat/completions", json=chat(max_tokens=2)) for _ in range(20)))
    assert {r.status_code for r in results} == {200}


async def test_a_keys_tier_reaches_priority_scheduled_engines_and_no_client_sets_its_own(
    make_app: Callable[..., FastAPI], db: Database, engine_url: str
) -> None:
    _, high = create_key(db, "interactive", priority="high")
    _, batch = create_key(db, "evals", priority="batch")
    _, normal = create_key(db, "web")

    async def seen(app: FastAPI, token: str, **extra: object) -> object:
        async with client_of(app, authorization=f"Bearer {token}") as client:
            assert (await client.post("/v1/chat/completions", json=chat(max_tokens=2, **extra))).status_code == 200
        async with httpx.AsyncClient() as engine:
            return (await engine.get(engine_url + "/last_body")).json().get("priority", "absent")

    scheduled = make_app(auth=True, priority_models=frozenset({"m1"}))
    assert await seen(scheduled, high) == -1
    assert await seen(scheduled, batch, priority=-100) == 1  # the key's tier, not the client's claim
    assert await seen(scheduled, normal, priority=-100) == "absent"  # normal: vLLM's default, 0
    plain = make_app(auth=True)  # engines without priority scheduling would refuse a non-zero priority
    assert await seen(plain, high, priority=3) == "absent"
