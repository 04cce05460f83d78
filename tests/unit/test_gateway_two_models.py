"""Two models behind two fake engines, and the gateway's bookkeeping checked in full: routing by name,
/ready for every model, the metrics while a stream is in flight, every ledger column, the database's
durability settings, and the defaults that protect users when nobody passes a flag."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from fastapi import FastAPI

from deploykit.serve.accounting.database import Database
from deploykit.serve.accounting.keys import create_key
from deploykit.serve.gateway import Backend, create_app
from deploykit.serve.gateway.app import GatewayOptions
from deploykit.serve.gateway.proxy import engine_session
from deploykit.serve.runner import ServeOptions
from deploykit.serve.supervisor import RestartPolicy
from tests.fakes.engine import PROMPT_TOKENS, create_fake_engine
from tests.fakes.threaded import serve_in_thread
from tests.unit.gateway_support import assert_openai_error, chat, client_of

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def second_engine_url() -> Iterator[str]:
    """A second fake engine, serving m2 at 20 ms a token."""
    with serve_in_thread(create_fake_engine("m2", token_delay=0.02)) as url:
        yield url


@pytest.fixture
async def two(engine_url: str, second_engine_url: str) -> AsyncIterator[tuple[Backend, Backend]]:
    async with engine_session() as session:
        yield (
            Backend("m1", engine_url, session, status="ready"),
            Backend("m2", second_engine_url, session, status="ready"),
        )


@pytest.fixture
def both(two: tuple[Backend, Backend], db: Database) -> Iterator[FastAPI]:
    app = create_app(list(two), db)
    yield app
    app.state.gateway.close()


async def test_each_model_name_goes_to_its_own_engine(both: FastAPI) -> None:
    async with client_of(both) as client:
        for name in ("m2", "m1", "m2"):
            response = await client.post("/v1/chat/completions", json=chat(model=name, max_tokens=2))
            assert response.status_code == 200 and response.json()["model"] == name
        listed = (await client.get("/v1/models")).json()["data"]
    assert sorted(m["id"] for m in listed) == ["m1", "m2"]


async def test_ready_needs_every_model_not_any(both: FastAPI, two: tuple[Backend, Backend]) -> None:
    m2 = two[1]
    async with client_of(both) as client:
        assert (await client.get("/ready")).status_code == 200
        m2.status = "starting"
        response = await client.get("/ready")
        assert_openai_error(response, 503, "not_ready")
        assert response.json()["models"] == {"m1": "ready", "m2": "starting"}
        assert (await client.post("/v1/chat/completions", json=chat(model="m1", max_tokens=1))).status_code == 200
        assert_openai_error(await client.post("/v1/chat/completions", json=chat(model="m2")), 503, "engine_unavailable")


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 when the series does not exist yet)."""
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            return float(match.group(2))
    return 0.0


async def test_metrics_move_while_a_stream_is_in_flight_and_settle_after(both: FastAPI) -> None:
    async with client_of(both) as client, client_of(both) as scraper:
        stream = asyncio.create_task(
            client.post("/v1/chat/completions", json=chat(model="m2", max_tokens=25, stream=True))
        )
        await asyncio.sleep(0.25)  # 25 tokens at 20 ms: half-way
        during = (await scraper.get("/metrics")).text
        assert (await stream).status_code == 200
        after = (await scraper.get("/metrics")).text
    assert sample(during, "deploykit_in_flight_requests", model="m2") == 1
    assert sample(during, "deploykit_request_duration_seconds_count", model="m2") == 0
    assert sample(after, "deploykit_in_flight_requests", model="m2") == 0
    assert sample(after, "deploykit_request_duration_seconds_count", model="m2") == 1
    assert 0.4 < sample(after, "deploykit_request_duration_seconds_sum", model="m2") < 5
    assert sample(after, "deploykit_ttft_seconds_count", model="m2") == 1
    assert sample(after, "deploykit_inter_token_seconds_count", model="m2") == 24
    assert sample(after, "deploykit_tokens_total", model="m2", kind="completion") == 25
    assert sample(after, "deploykit_in_flight_requests", model="m1") == 0


async def test_every_ledger_column_is_written(two: tuple[Backend, Backend], db: Database) -> None:
    key, token = create_key(db, "team-a")
    app = create_app(list(two), db, GatewayOptions(auth=True))
    before = time.time()
    async with client_of(app, authorization=f"Bearer {token}") as client:
        await client.post("/v1/chat/completions", json=chat(model="m2", max_tokens=3, stream=True))
        await client.post("/v1/completions", json={"model": "m1", "prompt": "x", "max_tokens": 2})
        await client.post("/v1/chat/completions", json=chat(model="m1", max_tokens=0))
    app.state.gateway.close()
    columns = [
        "at",
        "key_id",
        "model",
        "endpoint",
        "status",
        "prompt_tokens",
        "completion_tokens",
        "ttft_ms",
        "duration_ms",
        "replica",
        "error",
        "cost_usd",
        "day",
    ]
    rows = [
        dict(zip(columns, r, strict=True)) for r in db.query(f"SELECT {', '.join(columns)} FROM requests ORDER BY id")
    ]
    streamed, whole, refused = rows
    assert before <= streamed["at"] <= whole["at"] <= refused["at"] <= time.time()
    assert streamed["day"] == time.strftime("%Y-%m-%d", time.gmtime(streamed["at"]))
    assert {r["key_id"] for r in rows} == {key.id}
    assert (streamed["model"], streamed["endpoint"], streamed["status"]) == ("m2", "/v1/chat/completions", 200)
    assert (streamed["prompt_tokens"], streamed["completion_tokens"]) == (PROMPT_TOKENS, 3)
    assert streamed["replica"] == two[1].replica and whole["replica"] == two[0].replica
    assert 0 < streamed["ttft_ms"] <= streamed["duration_ms"] and streamed["duration_ms"] >= 40  # 3 tokens x 20 ms
    assert streamed["error"] is None and streamed["cost_usd"] is None
    assert (whole["model"], whole["endpoint"], whole["completion_tokens"], whole["ttft_ms"]) == (
        "m1",
        "/v1/completions",
        2,
        None,
    )
    assert (refused["status"], refused["error"], refused["replica"], refused["completion_tokens"]) == (
        400,
        "invalid_value",
        None,
        0,
    )


def test_sqlite_keeps_what_it_committed_through_a_kill(db: Database) -> None:
    assert db.query("PRAGMA journal_mode") == [("wal",)]
    assert db.query("PRAGMA synchronous") == [(1,)]  # NORMAL: durable across a process kill in WAL mode


# the defaults a user gets without a flag


def test_restart_policy_defaults() -> None:
    policy = RestartPolicy()
    assert (policy.backoff_s, policy.max_backoff_s, policy.max_failures, policy.stable_s) == (1.0, 60.0, 5, 60.0)
    assert [policy.delay_s(n) for n in (1, 2, 3, 4, 7, 8)] == [1, 2, 4, 8, 60, 60]


def test_serve_defaults_bound_the_drain_and_require_keys_beyond_loopback() -> None:
    options = ServeOptions()
    assert options.drain_timeout_s == 30.0 and options.host == "127.0.0.1" and not options.auth_required
    assert ServeOptions(host="0.0.0.0").auth_required and ServeOptions(host="::").auth_required
    assert ServeOptions(host="10.1.2.3").auth_required and not ServeOptions(host="::1").auth_required
    assert not ServeOptions(host="0.0.0.0", auth=False).auth_required  # only when asked, in so many words
    assert ServeOptions(auth=True).auth_required


def test_the_cli_defaults_are_the_library_defaults() -> None:
    import inspect

    from deploykit.cli.serve import serve

    params = inspect.signature(serve).parameters
    assert params["drain_timeout"].default.default == ServeOptions().drain_timeout_s
    assert params["host"].default == ServeOptions().host
    assert params["auth"].default.default is None  # None: decided by the host


async def test_usage_and_ledger_agree_with_what_the_client_saw(both: FastAPI, db: Database) -> None:
    async with client_of(both) as client:
        answer = await client.post("/v1/chat/completions", json=chat(model="m1", max_tokens=4))
    both.state.gateway.ledger.close()
    usage = answer.json()["usage"]
    assert db.query("SELECT prompt_tokens, completion_tokens FROM requests") == [
        (usage["prompt_tokens"], usage["completion_tokens"])
    ]
    assert json.loads(answer.text)["model"] == "m1"


async def test_an_engine_error_is_relayed_as_sent_and_recorded_as_one(
    two: tuple[Backend, Backend], db: Database
) -> None:
    app = create_app(list(two), db)
    async with client_of(app) as client:
        bad = await client.post("/v1/embeddings", json={"model": "m1", "input": 5})
        good = await client.post("/v1/embeddings", json={"model": "m1", "input": ["a b", "c"]})
        streamed = await client.post("/v1/chat/completions", json=chat(model="m2", max_tokens=2, stream=True))
        assert [b.outstanding for b in two] == [0, 0]  # each replica released, the streamed one when it ended
    app.state.gateway.close()
    assert bad.status_code == 400 and bad.headers["content-type"] == "application/json"
    assert bad.json()["error"]["message"] == "input must be a string or a list of strings"  # the engine's words
    assert good.status_code == 200 and good.headers["content-type"] == "application/json"
    assert streamed.headers["content-type"].startswith("text/event-stream")
    rows = db.query("SELECT endpoint, status, error, replica, prompt_tokens FROM requests ORDER BY id")
    assert rows == [
        ("/v1/embeddings", 400, "engine error", two[0].replica, 0),
        ("/v1/embeddings", 200, None, two[0].replica, 3),
        ("/v1/chat/completions", 200, None, two[1].replica, PROMPT_TOKENS),
    ]
