"""API keys, quotas, limits, the usage ledger and metrics, through the gateway in front of the fake engine."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from fastapi import FastAPI

from deploykit.core.errors import NotFoundError, UsageError
from deploykit.serve.accounting.database import Database
from deploykit.serve.accounting.keys import create_key, list_keys, revoke_key
from deploykit.serve.accounting.ledger import usage_by
from deploykit.serve.gateway import Backend, create_app
from deploykit.serve.gateway.app import Gateway, GatewayOptions
from deploykit.serve.gateway.metrics import relabel_engine_metrics
from deploykit.serve.gateway.proxy import engine_session
from tests.fakes.engine import ANSWER, PROMPT_TOKENS
from tests.unit.gateway_support import assert_openai_error, chat, client_of

pytestmark = pytest.mark.anyio
ANSWER_TOKENS = len(ANSWER.split())


def ledger_rows(app: FastAPI, db: Database) -> list[dict[str, object]]:
    """The ledger's rows once everything queued is committed."""
    app.state.gateway.ledger.close()
    names = ["key_id", "model", "endpoint", "status", "prompt_tokens", "completion_tokens", "ttft_ms", "error"]
    rows = db.query(f"SELECT {', '.join(names)} FROM requests ORDER BY id")
    return [dict(zip(names, row, strict=True)) for row in rows]


# keys


def test_a_key_is_stored_hashed_and_shown_once(db: Database) -> None:
    key, token = create_key(db, "team-a", models=["m1"], rpm=10)
    assert token.startswith(f"dk-{key.id}-")
    secret = token.split("-")[-1]
    stored = db.query("SELECT * FROM api_keys")
    assert secret not in json.dumps(stored)
    assert [k.name for k in list_keys(db)] == ["team-a"]
    assert list_keys(db)[0].public(time.time())["status"] == "active"


def test_key_names_are_unique_and_limits_positive(db: Database) -> None:
    create_key(db, "team-a")
    with pytest.raises(UsageError, match="exists already"):
        create_key(db, "team-a")
    with pytest.raises(UsageError, match="--rpm"):
        create_key(db, "team-b", rpm=0)
    with pytest.raises(UsageError, match="past"):
        create_key(db, "team-c", expires_at=time.time() - 1)


@pytest.mark.parametrize(
    ("kwargs", "message", "hint"),
    [
        (
            {"name": "-a"},
            "'-a' is not a valid key name.",
            "Use 1 to 64 letters, digits and . _ @ : - (starting with a letter or digit), e.g. team-a.",
        ),
        ({"models": []}, "--models names no model.", "Name at least one, or leave --models out for every model."),
        ({"rpm": 0}, "--rpm must be at least 1 (got 0).", "Leave it out for no limit."),
        ({"tpm": -5}, "--tpm must be at least 1 (got -5).", "Leave it out for no limit."),
        ({"max_concurrent": 0}, "--max-concurrent must be at least 1 (got 0).", "Leave it out for no limit."),
        ({"expires_at": 999.0}, "The expiry date is in the past.", "Give a future date, e.g. --expires 2027-01-31."),
        ({"name": "taken"}, "A key named 'taken' exists already.", "Choose another --name, or revoke that key first."),
    ],
)
def test_each_refused_key_says_what_and_what_to_do(db: Database, kwargs: dict, message: str, hint: str) -> None:  # type: ignore[type-arg]
    create_key(db, "taken")
    with pytest.raises(UsageError) as e:
        create_key(db, **{"name": "team-a", "now": 1000.0, **kwargs})
    assert (e.value.message, e.value.hint) == (message, hint)
    assert [k.name for k in list_keys(db)] == ["taken"]


def test_keys_list_json_shows_everything_but_the_secret(db: Database) -> None:
    key, token = create_key(db, "team-a", models=["m1", "m2"], rpm=10, tpm=500, max_concurrent=2, now=1000.0)
    everything = create_key(db, "team-b", expires_at=2000.0, now=1000.0)[0]
    assert key.public(1500.0) == {
        "id": key.id,
        "name": "team-a",
        "models": ["m1", "m2"],
        "rpm": 10,
        "tpm": 500,
        "max_concurrent": 2,
        "created_at": 1000.0,
        "expires_at": None,
        "revoked_at": None,
        "budget": None,
        "priority": "normal",
        "audio_spm": None,
        "status": "active",
    }
    assert token.split("-")[-1] not in json.dumps(key.public(1500.0))
    public = everything.public(2500.0)
    assert (public["models"], public["rpm"], public["expires_at"], public["status"]) == (None, None, 2000.0, "expired")
    assert everything.public(1999.0)["status"] == "active"
    assert everything.public(2000.0)["status"] == "expired"  # from its expiry time on, not after it


def test_revoke_by_name_or_id(db: Database) -> None:
    with pytest.raises(NotFoundError) as none:
        revoke_key(db, "team-a")
    assert none.value.hint == "Known keys: none yet (`deploykit keys list`)."
    key, _ = create_key(db, "team-a")
    create_key(db, "team-c")
    assert revoke_key(db, key.id, now=100.0).revoked_at == 100.0
    assert revoke_key(db, key.id).status(time.time()) == "revoked"
    assert revoke_key(db, "team-a", now=200.0).revoked_at == 100.0  # twice is fine, and keeps the first time
    with pytest.raises(NotFoundError) as e:
        revoke_key(db, "team-b")
    assert e.value.message == "No API key named 'team-b'."
    assert e.value.hint == "Known keys: team-a, team-c (`deploykit keys list`)."


def test_a_token_is_the_prefix_a_12_hex_id_and_a_48_hex_secret(db: Database) -> None:
    key, token = create_key(db, "team-a", now=1000.0)
    assert re.fullmatch(rf"dk-{key.id}-[0-9a-f]{{48}}", token) and re.fullmatch(r"[0-9a-f]{12}", key.id)
    with pytest.raises(UsageError, match="in the past"):
        create_key(db, "team-b", expires_at=1000.0, now=1000.0)  # expiring the moment it is made


# authentication


@pytest.fixture
def secured(make_app: Callable[..., FastAPI]) -> FastAPI:
    return make_app(auth=True)


async def test_without_auth_no_key_is_needed(gateway: httpx.AsyncClient) -> None:
    assert (await gateway.post("/v1/chat/completions", json=chat())).status_code == 200


@pytest.mark.parametrize("header", ["authorization", "api-key"])
async def test_bearer_and_azure_style_headers_are_accepted(secured: FastAPI, db: Database, header: str) -> None:
    _, token = create_key(db, "team-a")
    value = f"Bearer {token}" if header == "authorization" else token
    async with client_of(secured, **{header: value}) as client:
        response = await client.post("/v1/chat/completions", json=chat())
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"authorization": "Basic abc"}, "missing_api_key"),
        ({"authorization": "Bearer sk-not-ours"}, "invalid_api_key"),
        ({"authorization": "Bearer dk-000000000000-00"}, "invalid_api_key"),
        ({"api-key": "dk-"}, "invalid_api_key"),
    ],
)
async def test_missing_or_wrong_keys_are_401(secured: FastAPI, headers: dict[str, str], code: str) -> None:
    async with client_of(secured, **headers) as client:
        response = await client.post("/v1/chat/completions", json=chat())
    assert_openai_error(response, 401, code)
    assert response.headers["www-authenticate"] == "Bearer"


async def test_a_right_id_with_a_wrong_secret_is_401(secured: FastAPI, db: Database) -> None:
    _, token = create_key(db, "team-a")
    async with client_of(secured, authorization=f"Bearer {token[:-1]}x") as client:
        assert_openai_error(await client.post("/v1/chat/completions", json=chat()), 401, "invalid_api_key")


async def test_revoked_and_expired_keys_are_401(secured: FastAPI, db: Database) -> None:
    revoked, revoked_token = create_key(db, "revoked")
    revoke_key(db, revoked.id)
    expired, expired_token = create_key(db, "expired", expires_at=time.time() + 3600)
    db.execute("UPDATE api_keys SET expires_at = ? WHERE id = ?", (time.time() - 1, expired.id))
    for token, code in ((revoked_token, "revoked_api_key"), (expired_token, "expired_api_key")):
        async with client_of(secured, authorization=f"Bearer {token}") as client:
            assert_openai_error(await client.post("/v1/chat/completions", json=chat()), 401, code)


async def test_a_key_limited_to_a_model_uses_it(secured: FastAPI, db: Database) -> None:
    _, token = create_key(db, "team-a", models=["m1"])
    async with client_of(secured, authorization=f"Bearer {token}") as client:
        assert (await client.post("/v1/chat/completions", json=chat(max_tokens=2))).status_code == 200
        assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == ["m1"]


async def test_a_key_limited_to_other_models_is_403_and_sees_none(secured: FastAPI, db: Database) -> None:
    _, token = create_key(db, "team-a", models=["other"])
    async with client_of(secured, authorization=f"Bearer {token}") as client:
        error = assert_openai_error(await client.post("/v1/chat/completions", json=chat()), 403, "model_not_allowed")
        assert error["type"] == "permission_error"
        assert (await client.get("/v1/models")).json()["data"] == []
        assert_openai_error(await client.get("/v1/models", headers={"authorization": ""}), 401)


# quotas and limits


async def test_over_the_request_quota_is_429_with_retry_after(secured: FastAPI, db: Database) -> None:
    _, token = create_key(db, "team-a", rpm=2)
    async with client_of(secured, authorization=f"Bearer {token}") as client:
        ok = [await client.post("/v1/chat/completions", json=chat()) for _ in range(2)]
        limited = await client.post("/v1/chat/completions", json=chat())
    assert [r.status_code for r in ok] == [200, 200]
    assert ok[0].headers["x-ratelimit-limit-requests"] == "2"
    assert ok[1].headers["x-ratelimit-remaining-requests"] == "0"
    assert_openai_error(limited, 429, "rate_limit_exceeded")
    assert int(limited.headers["retry-after"]) == 30


async def test_shared_quotas_are_taken_from_the_database(make_app: Callable[..., FastAPI], db: Database) -> None:
    # what `serve` turns on with PostgreSQL, here on the SQLite file: the same answers as quotas in memory
    _, token = create_key(db, "team-a", rpm=2, tpm=1_000)
    shared = make_app(auth=True, shared_quotas=True)
    async with client_of(shared, authorization=f"Bearer {token}") as client:
        ok = [await client.post("/v1/chat/completions", json=chat(max_tokens=6)) for _ in range(2)]
        limited = await client.post("/v1/chat/completions", json=chat(max_tokens=6))
    assert [r.status_code for r in ok] == [200, 200]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in ok] == ["1", "0"]
    assert int(ok[0].headers["x-ratelimit-remaining-tokens"]) < 1_000
    assert_openai_error(limited, 429, "rate_limit_exceeded")
    [(requests,)] = db.query("SELECT requests FROM quota_state")
    assert requests < 1  # the state is in the database, where another gateway reads it


async def test_quotas_stay_in_memory_unless_shared(make_app: Callable[..., FastAPI], db: Database) -> None:
    # one gateway on SQLite: the database holds keys and the ledger, not a row per request of quota state
    _, token = create_key(db, "team-a", rpm=2)
    async with client_of(make_app(auth=True), authorization=f"Bearer {token}") as client:
        assert (await client.post("/v1/chat/completions", json=chat(max_tokens=2))).status_code == 200
    assert db.query("SELECT COUNT(*) FROM quota_state") == [(0,)]


async def test_the_engines_request_id_comes_back_beside_the_quota_headers(secured: FastAPI, db: Database) -> None:
    _, token = create_key(db, "team-a", rpm=10)
    async with client_of(secured, authorization=f"Bearer {token}") as client:
        whole = await client.post("/v1/chat/completions", json=chat(max_tokens=2), headers={"x-request-id": "r-1"})
        body, second = chat(max_tokens=2, stream=True), {"x-request-id": "r-2"}
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=second) as streamed:
            await streamed.aread()
    for response, request_id in ((whole, "r-1"), (streamed, "r-2")):
        assert response.status_code == 200
        assert response.headers["x-request-id"] == request_id
        assert response.headers["x-ratelimit-limit-requests"] == "10"
    assert streamed.headers["content-type"].startswith("text/event-stream")


async def test_tokens_are_settled_to_the_engines_usage(secured: FastAPI, db: Database) -> None:
    _, token = create_key(db, "team-a", tpm=10_000)
    async with client_of(secured, authorization=f"Bearer {token}") as client:
        started = time.monotonic()
        first = await client.post("/v1/chat/completions", json=chat(max_tokens=6))
        second = await client.post("/v1/chat/completions", json=chat(max_tokens=6))
        refilled = (time.monotonic() - started) * 10_000 / 60  # the bucket refills while the test runs
    reserved = int(first.headers["x-ratelimit-limit-tokens"]) - int(first.headers["x-ratelimit-remaining-tokens"])
    used = PROMPT_TOKENS + 6
    assert reserved > used  # the estimate is deliberately high...
    remaining = int(second.headers["x-ratelimit-remaining-tokens"])
    assert 10_000 - remaining - reserved == pytest.approx(used, abs=1 + refilled)  # ...and settled to what was used


async def test_concurrent_requests_are_never_over_admitted(db: Database, slow_engine_url: str) -> None:
    async with engine_session() as session:
        app = create_app([Backend("m1", slow_engine_url, session, status="ready")], db, GatewayOptions(auth=True))
        _, token = create_key(db, "team-a", max_concurrent=3, rpm=1000)
        async with client_of(app, authorization=f"Bearer {token}") as client:
            responses = await asyncio.gather(
                *(client.post("/v1/chat/completions", json=chat(max_tokens=6)) for _ in range(20))
            )
        app.state.gateway.close()
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 3 + [429] * 17
    assert {r.json()["error"]["type"] for r in responses if r.status_code == 429} == {"concurrent_requests"}


async def test_a_body_over_the_limit_is_413(make_app: Callable[..., FastAPI]) -> None:
    async with client_of(make_app(max_body_bytes=100)) as client:
        response = await client.post("/v1/completions", json={"model": "m1", "prompt": "x" * 200})
    assert_openai_error(
        response, 413, "request_too_large", "The request body is larger than this gateway's limit of 100 bytes."
    )


def _padded(size: int) -> bytes:
    """A completion request of exactly `size` bytes."""
    body = json.dumps({"model": "m1", "prompt": "x", "max_tokens": 1}).encode()
    return body[:-1] + b" " * (size - len(body)) + b"}"


async def _chunks(data: bytes, *, pause_s: float = 0.0) -> AsyncIterator[bytes]:
    """A body sent in two pieces (chunked: no content-length), with a pause between them."""
    yield data[:40]
    await asyncio.sleep(pause_s)
    yield data[40:]


async def test_the_body_limit_is_counted_as_it_arrives_to_the_byte(make_app: Callable[..., FastAPI]) -> None:
    async with client_of(make_app(max_body_bytes=100)) as client:
        post = client.post
        assert (await post("/v1/completions", content=_padded(100))).status_code == 200  # declared, at the limit
        assert (await post("/v1/completions", content=_chunks(_padded(100)))).status_code == 200  # counted
        too_large = await post("/v1/completions", content=_chunks(_padded(101)))
    assert_openai_error(
        too_large, 413, "request_too_large", "The request body is larger than this gateway's limit of 100 bytes."
    )


async def test_a_body_that_stalls_is_a_408_and_a_declared_excess_is_refused_at_once(
    make_app: Callable[..., FastAPI],
) -> None:
    async with client_of(make_app(max_body_bytes=1000, body_timeout_s=0.2)) as client:
        stalled = await client.post("/v1/completions", content=_chunks(_padded(100), pause_s=1))
        started = time.monotonic()
        # the header says too much: refused before reading, though the body itself would stall
        declared = await client.post(
            "/v1/completions", content=_chunks(_padded(100), pause_s=1), headers={"content-length": "5000"}
        )
        declared_s = time.monotonic() - started
    assert_openai_error(stalled, 408, "request_timeout", "The request body did not arrive within 0.2 s.")
    assert_openai_error(declared, 413, "request_too_large")
    assert declared_s < 0.2


async def test_a_request_whose_model_is_not_a_string_is_recorded_without_one(app: FastAPI, db: Database) -> None:
    async with client_of(app) as client:
        assert_openai_error(await client.post("/v1/chat/completions", json=chat(model=5)), 400, "missing_model")
    await app.state.gateway.stop(timeout_s=1)
    assert db.query("SELECT status, model FROM requests") == [(400, "")]


async def test_an_unexpected_error_while_proxying_is_a_500_with_its_ledger_row(
    app: FastAPI, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deploykit.serve.gateway import app as gateway_app

    async def broken(*_args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(gateway_app, "forward", broken)
    async with client_of(app) as client:
        response = await client.post("/v1/chat/completions", json=chat())
    assert_openai_error(response, 500, None, "Internal gateway error: RuntimeError")
    await app.state.gateway.stop(timeout_s=1)  # commits the ledger
    assert db.query("SELECT status, error, model FROM requests") == [(500, "RuntimeError", "m1")]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
async def test_a_get_to_a_proxied_path_is_405_and_reaches_no_engine(
    app: FastAPI, db: Database, engine_url: str, path: str
) -> None:
    before = httpx.get(engine_url + "/stats").json()
    async with client_of(app) as client:
        response = await client.get(path)
    assert_openai_error(response, 405, None, "Method Not Allowed")
    assert response.headers["allow"] == "POST"
    assert httpx.get(engine_url + "/stats").json() == before
    await app.state.gateway.stop(timeout_s=1)
    assert db.query("SELECT COUNT(*) FROM requests") == [(0,)]  # not a model request: no ledger row


@pytest.mark.parametrize(
    ("value", "code"), [(101, "max_tokens_too_large"), (0, "invalid_value"), ("9", "invalid_value")]
)
async def test_max_tokens_is_checked(make_app: Callable[..., FastAPI], value: object, code: str) -> None:
    async with client_of(make_app(max_tokens=100)) as client:
        response = await client.post("/v1/chat/completions", json=chat(max_tokens=value))
    assert assert_openai_error(response, 400, code)["param"] == "max_tokens"


@pytest.mark.parametrize(("field", "value"), [("stream", [1]), ("stream", "yes"), ("stream_options", 6.5e16)])
async def test_stream_fields_of_the_wrong_type_are_400(gateway: httpx.AsyncClient, field: str, value: object) -> None:
    response = await gateway.post("/v1/chat/completions", json={**chat(), field: value})
    kind = "a boolean" if field == "stream" else "an object"
    assert assert_openai_error(response, 400, "invalid_type", f"{field} must be {kind}.")["param"] == field


# ledger


async def test_every_request_is_in_the_ledger_with_its_usage(secured: FastAPI, db: Database) -> None:
    key, token = create_key(db, "team-a")
    async with client_of(secured, authorization=f"Bearer {token}") as client:
        await client.post("/v1/chat/completions", json=chat(max_tokens=6))
        async with client.stream("POST", "/v1/completions", json={"model": "m1", "prompt": "x", "stream": True}) as r:
            raw = b"".join([chunk async for chunk in r.aiter_raw()])
        await client.post("/v1/embeddings", json={"model": "m1", "input": ["a b c", "d"]})
        await client.post("/v1/chat/completions", json=chat(model="nope"))
    async with client_of(secured) as anonymous:
        await anonymous.post("/v1/chat/completions", json=chat())
    rows = ledger_rows(secured, db)
    assert [(r["endpoint"], r["status"], r["key_id"]) for r in rows] == [
        ("/v1/chat/completions", 200, key.id),
        ("/v1/completions", 200, key.id),
        ("/v1/embeddings", 200, key.id),
        ("/v1/chat/completions", 404, key.id),
        ("/v1/chat/completions", 401, None),
    ]
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (PROMPT_TOKENS, 6)
    assert (rows[1]["prompt_tokens"], rows[1]["completion_tokens"]) == (PROMPT_TOKENS, 16)
    assert rows[1]["ttft_ms"] is not None and rows[0]["ttft_ms"] is None
    assert (rows[2]["prompt_tokens"], rows[2]["completion_tokens"]) == (4, 0)
    assert rows[3]["error"] == "model_not_found" and rows[4]["error"] == "missing_api_key"
    # the gateway asked for the usage chunk to count tokens; the client did not, so it never saw it
    assert b'"usage"' not in raw and raw.endswith(b"data: [DONE]\n\n")
    by_key = {row.group: row for row in usage_by(db, "key")}
    assert by_key["team-a"].requests == 4 and by_key["team-a"].errors == 1
    assert by_key["(no key)"].requests == 1


async def test_the_usage_chunk_is_asked_for_beside_the_clients_own_stream_options(
    gateway: httpx.AsyncClient, state: Gateway, engine_url: str
) -> None:
    assert state.router.models["m1"].recent_ttft_s is None
    body = chat(stream=True, stream_options={"continuous_usage_stats": True}, max_tokens=2)
    async with gateway.stream("POST", "/v1/chat/completions", json=body) as response:
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
    assert b'"usage"' not in raw  # not asked for by the client: stripped on the way back
    sent = httpx.get(engine_url + "/last_body").json()
    assert sent["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}
    assert state.router.models["m1"].recent_ttft_s is not None  # each answer's TTFT, for spill-over by TTFT


async def test_a_client_that_asks_for_usage_still_gets_it(gateway: httpx.AsyncClient) -> None:
    body = chat(stream=True, stream_options={"include_usage": True}, max_tokens=3)
    async with gateway.stream("POST", "/v1/chat/completions", json=body) as response:
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
    events = [json.loads(e[6:]) for e in raw.decode().split("\n\n") if e.startswith("data: {")]
    assert events[-1]["usage"]["completion_tokens"] == 3


# metrics


async def test_metrics_count_requests_tokens_and_latency(gateway: httpx.AsyncClient, backend: Backend) -> None:
    await gateway.post("/v1/chat/completions", json=chat(stream=True, max_tokens=4))
    await gateway.post("/v1/chat/completions", json=chat(model="nope"))
    await gateway.post("/v1/chat/completions", json=chat(stream="yes"))  # refused before routing, model named
    text = (await gateway.get("/metrics")).text
    assert 'deploykit_requests_total{key="",model="m1",status="200"} 1.0' in text
    assert 'deploykit_requests_total{key="",model="unknown",status="404"} 1.0' in text  # not the made-up name
    assert 'deploykit_requests_total{key="",model="m1",status="400"} 1.0' in text  # a served name is kept
    assert 'deploykit_tokens_total{key="",kind="completion",model="m1"} 4.0' in text
    assert 'deploykit_ttft_seconds_count{model="m1"} 1.0' in text
    assert 'deploykit_inter_token_seconds_count{model="m1"} 3.0' in text
    assert 'deploykit_in_flight_requests{model="m1"} 0.0' in text
    assert f'deploykit_replica_up{{model="m1",replica="{backend.url}"}} 1.0' in text
    # the engine's own figures, re-exported per replica
    assert f'vllm:num_requests_running{{replica="{backend.url}",model_name="m1"}} 0' in text


def test_engine_metrics_are_re_exported_with_a_replica_label() -> None:
    text = "\n".join(
        [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            'vllm:num_requests_running{engine="0",model_name="m1"} 3.0',
            "vllm:num_requests_waiting 1.0",
            'vllm:prompt_tokens_total{model_name="m1"} 99.0',
        ]
    )
    assert relabel_engine_metrics(text, "http://127.0.0.1:9000") == [
        'vllm:num_requests_running{replica="http://127.0.0.1:9000",engine="0",model_name="m1"} 3.0',
        'vllm:num_requests_waiting{replica="http://127.0.0.1:9000"} 1.0',
    ]
