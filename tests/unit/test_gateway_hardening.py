"""The gateway against what an attacker sends: limits read the way the engine reads them, bodies that
break parsers, labels a client makes up, a redirect built from Host, compressed upstreams, and the
operator's pages with keys on. Each test here failed on the gateway before it was hardened (#11)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi import FastAPI

from deploykit.models.prices import load_prices
from deploykit.serve.accounting.database import Database
from deploykit.serve.accounting.keys import create_key
from deploykit.serve.gateway import Backend, create_app
from deploykit.serve.gateway.app import GatewayOptions
from deploykit.serve.gateway.errors import GatewayError, unexpected_error_response
from deploykit.serve.gateway.proxy import MAX_JSON_DEPTH, engine_session, parse_body
from deploykit.serve.gateway.spill import parse_spill
from deploykit.serve.gateway.tokens import budget_tokens
from tests.fakes.engine import CONTEXT, PROMPT_TOKENS, create_fake_engine
from tests.fakes.threaded import serve_in_thread
from tests.unit.gateway_support import assert_openai_error, chat, client_of

pytestmark = pytest.mark.anyio


def completion(**extra: object) -> dict[str, object]:
    return {"model": "m1", "prompt": "Capital of France?", **extra}


def served_tokens(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    return int(response.json()["usage"]["completion_tokens"])


def ledger(app: FastAPI, db: Database, columns: str = "status, model, completion_tokens") -> list[tuple[object, ...]]:
    app.state.gateway.ledger.close()
    return db.query(f"SELECT {columns} FROM requests ORDER BY id")


@pytest.fixture
async def with_context(engine_url: str) -> AsyncIterator[Backend]:
    """The fake engine as serve builds it: the backend knows the engine's context length."""
    async with engine_session() as session:
        yield Backend("m1", engine_url, session, status="ready", context=CONTEXT)


# max_tokens: the field the engine will use, on each route


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", chat(max_completion_tokens=None, max_tokens=200)),
        ("/v1/completions", completion(max_completion_tokens=None, max_tokens=200)),
        ("/v1/completions", completion(max_completion_tokens=1, max_tokens=200)),
        ("/v1/chat/completions", chat(max_completion_tokens=1, max_tokens=200)),
        ("/v1/chat/completions", chat(max_completion_tokens=200)),
    ],
)
async def test_max_tokens_cannot_be_smuggled_past_the_limit(
    make_app: object, path: str, body: dict[str, object]
) -> None:
    app = make_app(max_tokens=50)  # type: ignore[operator]
    async with client_of(app) as client:
        error = assert_openai_error(await client.post(path, json=body), 400, "max_tokens_too_large")
    assert error["param"] in ("max_tokens", "max_completion_tokens")


async def test_a_chat_request_without_max_tokens_gets_the_gateway_limit(make_app: object) -> None:
    app = make_app(max_tokens=50)  # type: ignore[operator]
    async with client_of(app) as client:
        assert served_tokens(await client.post("/v1/chat/completions", json=chat())) == 50
        assert served_tokens(await client.post("/v1/chat/completions", json=chat(max_tokens=None))) == 50
        assert served_tokens(await client.post("/v1/chat/completions", json=chat(max_tokens=7))) == 7
        streamed = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert streamed.text.count('"content": " ') + streamed.text.count('"content": "The') == 50


async def test_a_completion_without_max_tokens_keeps_the_engine_default_unless_the_limit_is_lower(
    make_app: object,
) -> None:
    async with client_of(make_app(max_tokens=8)) as client:  # type: ignore[operator]
        assert served_tokens(await client.post("/v1/completions", json=completion())) == 8
    async with client_of(make_app(max_tokens=50)) as client:  # type: ignore[operator]
        assert served_tokens(await client.post("/v1/completions", json=completion())) == 16


async def test_without_max_tokens_a_token_limited_key_is_charged_the_whole_context(
    with_context: Backend, db: Database
) -> None:
    _, token = create_key(db, "team-a", tpm=100)
    app = create_app([with_context], db, GatewayOptions(auth=True))
    async with client_of(app, authorization=f"Bearer {token}") as client:
        first = await client.post("/v1/chat/completions", json=chat())
        second = await client.post("/v1/chat/completions", json=chat())
    assert served_tokens(first) == CONTEXT  # the engine generated to the end of its context
    assert_openai_error(second, 429, "rate_limit_exceeded")  # 100 - (5 + 64) left: not enough for another
    assert sum(row[2] for row in ledger(app, db)) <= 100 - PROMPT_TOKENS  # type: ignore[misc]


async def test_every_choice_is_reserved(make_app: object, db: Database) -> None:
    _, token = create_key(db, "team-a", tpm=100)
    app = make_app(auth=True)  # type: ignore[operator]
    async with client_of(app, authorization=f"Bearer {token}") as client:
        for extra in ({"n": 4}, {"best_of": 4}):
            response = await client.post("/v1/completions", json=completion(max_tokens=30, **extra))
            assert_openai_error(response, 429, "rate_limit_exceeded")
        assert served_tokens(await client.post("/v1/completions", json=completion(max_tokens=30, n=2))) == 30


@pytest.mark.parametrize("extra", [{"n": 0}, {"n": "4"}, {"best_of": -1}, {"max_tokens": True}, {"max_tokens": 1.5}])
async def test_choice_and_token_counts_must_be_positive_integers(
    gateway: httpx.AsyncClient, extra: dict[str, object]
) -> None:
    assert_openai_error(await gateway.post("/v1/completions", json=completion(**extra)), 400, "invalid_value")


async def test_a_key_with_a_token_limit_needs_max_tokens_when_the_context_is_unknown(
    make_app: object, db: Database
) -> None:
    _, token = create_key(db, "team-a", tpm=1000)
    async with client_of(make_app(auth=True), authorization=f"Bearer {token}") as client:  # type: ignore[operator]
        message = "The API key 'team-a' has a tokens-per-minute limit, and this request sets no max_tokens."
        response = await client.post("/v1/chat/completions", json=chat())
        assert assert_openai_error(response, 400, "max_tokens_required", message)["param"] == "max_tokens"
        assert served_tokens(await client.post("/v1/chat/completions", json=chat(max_tokens=3))) == 3


@pytest.mark.parametrize(
    ("path", "body", "limit", "context", "expected"),
    [
        # (max_tokens per choice, reservation, injected)
        ("/v1/chat/completions", {}, None, 4096, (4096, 4096, None)),
        ("/v1/chat/completions", {}, 50, 4096, (50, 40 + 50, 50)),
        ("/v1/chat/completions", {}, 9000, 4096, (4096, 4096, 4096)),
        ("/v1/chat/completions", {"max_completion_tokens": 10, "max_tokens": 20}, None, 4096, (10, 50, None)),
        ("/v1/chat/completions", {"max_tokens": 20, "n": 3}, None, 4096, (20, 100, None)),
        ("/v1/chat/completions", {"max_tokens": 4090, "n": 2}, None, 4096, (4090, 8192, None)),
        ("/v1/completions", {"max_completion_tokens": 10}, None, 4096, (16, 56, None)),
        ("/v1/completions", {"best_of": 3, "n": 2, "max_tokens": 10}, None, None, (10, 70, None)),
        ("/v1/chat/completions", {}, None, None, (None, None, None)),
        ("/v1/embeddings", {"max_tokens": 10}, None, 512, (0, 40, None)),
    ],
)
def test_the_token_budget_as_the_engine_reads_the_request(
    path: str, body: dict[str, object], limit: int | None, context: int | None, expected: tuple[object, ...]
) -> None:
    budget = budget_tokens(body, path, 160, limit=limit, context=context)  # 160 bytes: a 40-token prompt estimate
    assert (budget.max_tokens, budget.reserve, budget.inject) == expected


# bodies that break parsers


async def test_deeply_nested_json_is_a_400_in_the_ledger(app: FastAPI, db: Database) -> None:
    async with client_of(app) as client:
        response = await client.post("/v1/chat/completions", content=b"[" * 20_000)
        nested_object = b'{"model": "m1", "messages": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
        deep = await client.post("/v1/chat/completions", content=nested_object)
    assert_openai_error(response, 400)
    assert_openai_error(deep, 400)
    assert [row[0] for row in ledger(app, db)] == [400, 400]


@pytest.mark.parametrize(("depth", "accepted"), [(MAX_JSON_DEPTH, True), (MAX_JSON_DEPTH + 1, False), (5_000, False)])
def test_the_nesting_bound_is_exact_whatever_the_stack(depth: int, accepted: bool) -> None:
    # The object itself is level 1; brackets inside strings and wide bodies (many brackets, shallow) do not count.
    deep = b"[0, " + b"[" * (depth - 2) + b"]" * (depth - 2) + b"]"  # a scalar first, then the depth
    raw = b'{"a": "[[[[", "deep": ' + deep + b', "wide": [' + b"{}, " * 200 + b"{}]}"
    scalar_last = b'{"deep": ' + deep + b', "n": 1}'  # a scalar looked at before the deep branch
    if accepted:
        assert parse_body(raw)["a"] == "[[[["
        assert parse_body(scalar_last)["n"] == 1
        assert parse_body(b'{"s": "' + b"[" * 5_000 + b'"}')["s"] == "[" * 5_000
    else:
        with pytest.raises(GatewayError, match=f"nested more than {MAX_JSON_DEPTH} levels") as refused:
            parse_body(raw)
        assert (refused.value.status, refused.value.type) == (400, "invalid_request_error")
        with pytest.raises(GatewayError, match=f"nested more than {MAX_JSON_DEPTH} levels"):
            parse_body(scalar_last)

    # the same on a deep stack: the bound, not the interpreter's recursion limit, decides
    def at_depth(n: int) -> bool:
        if n:
            return at_depth(n - 1)
        try:
            parse_body(raw)
        except GatewayError:
            return False
        return True

    assert at_depth(sys.getrecursionlimit() - 200) is accepted


# labels a client makes up


async def test_unknown_model_names_do_not_grow_the_metrics(app: FastAPI, db: Database) -> None:
    async with client_of(app) as client:
        await client.post("/v1/chat/completions", json=chat(model="first"))  # the "unknown" series exist now
        before = len((await client.get("/metrics")).text)
        for i in range(20):
            await client.post("/v1/chat/completions", json=chat(model=f"{i}" + "x" * 10_000))
        text = (await client.get("/metrics")).text
    assert len(text) - before < 200, "each made-up name became a label"
    assert "xxxxxxxxxx" not in text and 'model="unknown",status="404"} 21.0' in text
    assert all(len(str(model)) <= 64 for _, model, _ in ledger(app, db))


# a redirect built from the client's Host header


async def test_a_trailing_slash_is_a_404_not_a_redirect_to_the_host_header(gateway: httpx.AsyncClient) -> None:
    response = await gateway.post("/v1/chat/completions/", json=chat(), headers={"host": "evil.example"})
    assert response.status_code == 404 and "location" not in response.headers
    assert (await gateway.get("/v1/models/", headers={"host": "evil.example"})).status_code == 404


# a client that leaves while sending its body


@pytest.fixture
def gateway_over_http(engine_url: str, db: Database) -> Iterator[str]:
    apps: list[FastAPI] = []

    async def build() -> FastAPI:
        apps.append(create_app([Backend("m1", engine_url, engine_session(), status="ready")], db))
        return apps[0]

    async def stop() -> None:
        await apps[0].state.gateway.router.replicas[0].session.close()

    with serve_in_thread(build=build, on_stop=stop) as url:
        yield url


async def test_a_client_that_leaves_during_its_body_is_a_quiet_499(
    gateway_over_http: str, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    port = int(gateway_over_http.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 1000\r\n\r\n" + b'{"model": "m1", '
        )
        await asyncio.sleep(0.2)
    for _ in range(50):
        await asyncio.sleep(0.05)
        if db.query("SELECT status FROM requests"):
            break
    assert db.query("SELECT status, error FROM requests") == [(499, "client disconnected")]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# an upstream that compresses


@pytest.mark.parametrize("mode", ["on_request", "always"])
async def test_a_compressed_upstream_is_decoded_and_counted(
    db: Database, engine_url: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve_in_thread(create_fake_engine("gpt-4o-mini", api_key="sk", gzip=mode)) as managed:
        spill = parse_spill(f"m1=gpt-4o-mini@{managed}/v1", load_prices(), "sk")
        async with engine_session() as session:
            app = create_app(
                [Backend("m1", engine_url, session, status="stopped")], db, GatewayOptions(spills=(spill,))
            )
            async with client_of(app) as client:
                whole = await client.post("/v1/chat/completions", json=chat(max_tokens=6))
                streamed = await client.post("/v1/chat/completions", json=chat(max_tokens=4, stream=True))
    for response in (whole, streamed):
        assert response.status_code == 200
        assert response.headers.get("content-encoding") is None
    assert whole.json()["usage"]["completion_tokens"] == 6
    assert streamed.text.rstrip().endswith("data: [DONE]")
    assert [row[2] for row in ledger(app, db)] == [6, 4]


# the operator's pages with API keys on


def client_from(app: FastAPI, host: str, **headers: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(host, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://gateway", headers=headers)


@pytest.mark.parametrize("path", ["/metrics", "/openapi.json", "/docs", "/redoc"])
async def test_operator_pages_need_the_metrics_token_or_loopback_when_keys_are_on(make_app: object, path: str) -> None:
    secured = make_app(auth=True)  # type: ignore[operator]
    async with client_from(secured, "203.0.113.7") as remote:
        message = f"{path} is for the operator when API keys are on: it needs a request from this host."
        response = await remote.get(path)
        assert_openai_error(response, 401, "operator_only", message)
        assert response.headers["www-authenticate"] == "Bearer"
    async with client_from(secured, "127.0.0.1") as local:
        assert (await local.get(path)).status_code == 200
    with_token = make_app(auth=True, metrics_token="m-secret")  # type: ignore[operator]
    async with client_from(with_token, "127.0.0.1") as local:
        message = f"{path} is for the operator when API keys are on: it needs its metrics token as a Bearer."
        assert_openai_error(await local.get(path), 401, "operator_only", message)  # a token set: loopback is not enough
    async with client_from(with_token, "203.0.113.7", authorization="Bearer m-secret") as prometheus:
        assert (await prometheus.get(path)).status_code == 200
    async with client_from(with_token, "203.0.113.7", authorization="bearer  m-secret") as spaced:
        assert (await spaced.get(path)).status_code == 200  # the scheme in any case, the token stripped
    for wrong in ("Basic m-secret", "Bearer m-secret2", "m-secret"):
        async with client_from(with_token, "127.0.0.1", authorization=wrong) as client:
            assert (await client.get(path)).status_code == 401, wrong
    async with client_from(make_app(), "203.0.113.7") as open_gateway:  # type: ignore[operator]
        assert (await open_gateway.get(path)).status_code == 200


async def test_ready_shows_no_engine_urls_to_others_when_keys_are_on(make_app: object, backend: Backend) -> None:
    secured = make_app(auth=True)  # type: ignore[operator]
    async with client_from(secured, "203.0.113.7") as remote:
        response = await remote.get("/ready")
    assert response.status_code == 200 and response.json() == {"status": "ready"}
    async with client_from(secured, "127.0.0.1") as local:
        detail = (await local.get("/ready")).json()
    assert detail["models"] == {"m1": "ready"} and backend.url in json.dumps(detail)


async def test_version_needs_a_key_when_keys_are_on(make_app: object, db: Database) -> None:
    _, token = create_key(db, "team-a")
    secured = make_app(auth=True)  # type: ignore[operator]
    async with client_from(secured, "203.0.113.7") as anonymous:
        assert_openai_error(await anonymous.get("/version"), 401, "missing_api_key")
    async with client_from(secured, "203.0.113.7", authorization=f"Bearer {token}") as client:
        assert (await client.get("/version")).json()["version"] == "0.0.0-fake"


# what held in the attack, kept so


@pytest.mark.parametrize(
    "path",
    [
        "/tokenize",
        "/detokenize",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/sleep",
        "/wake_up",
        "/collective_rpc",
        "/start_profile",
        "/stop_profile",
        "/pooling",
        "/reset_prefix_cache",
        "/invocations",
        "/score",
        "/rerank",
        "/v1/responses",
        "/v1/chat/completions/../../tokenize",
    ],
)
async def test_no_engine_admin_route_is_reachable(gateway: httpx.AsyncClient, path: str) -> None:
    for method in ("GET", "POST"):
        response = await gateway.request(method, path, json={"model": "m1", "prompt": "x"})
        assert response.status_code in (404, 405), (method, path, response.status_code)


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ({}, "?api_key=TOKEN"),
        ({"authorization": "Bearer " + "dk-" + "a" * 65_536}, ""),
        ({"authorization": "Bearer dk-ünïcode-sécret".encode().decode("latin-1")}, ""),
        ({"authorization": "Bearer  TOKEN x"}, ""),
        ({"x-api-key": "TOKEN"}, ""),
    ],
)
async def test_keys_anywhere_but_the_two_headers_or_malformed_are_refused(
    make_app: object, db: Database, headers: dict[str, str], query: str
) -> None:
    _, token = create_key(db, "team-a")
    secured = make_app(auth=True)  # type: ignore[operator]
    sent = {k: v.replace("TOKEN", token).encode("latin-1") for k, v in headers.items()}  # raw bytes on the wire
    async with client_of(secured) as client:
        path = "/v1/chat/completions" + query.replace("TOKEN", token)
        response = await client.post(path, json=chat(), headers=sent)  # type: ignore[arg-type]
    assert_openai_error(response, 401)


async def test_no_credential_reaches_the_engine_or_the_log(
    make_app: object, db: Database, engine_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    _, token = create_key(db, "team-a")
    secured = make_app(auth=True)  # type: ignore[operator]
    headers = {"authorization": f"Bearer {token}", "cookie": "session=s3cret", "x-request-id": "r-1"}
    async with client_of(secured, **headers) as client:
        assert (await client.post("/v1/chat/completions", json=chat(max_tokens=2))).status_code == 200
        bad = await client.post("/v1/chat/completions", json=chat(max_tokens=2), headers={"api-key": token + "x"})
    assert bad.status_code == 401
    seen = httpx.get(engine_url + "/last_headers").json()
    assert seen.get("x-request-id") == "r-1"
    assert not {"authorization", "api-key", "cookie"} & set(seen), seen
    assert token not in json.dumps(seen) and token.split("-")[-1] not in caplog.text


def test_an_unexpected_error_is_a_500_that_names_only_its_class(caplog: pytest.LogCaptureFixture) -> None:
    try:
        raise KeyError("secret-engine-url")
    except KeyError as e:
        response = unexpected_error_response(e)
    assert response.status_code == 500
    assert json.loads(bytes(response.body)) == {
        "error": {"message": "Internal gateway error: KeyError", "type": "server_error", "param": None, "code": None}
    }
    assert "unexpected error in the gateway" in caplog.text and "secret-engine-url" in caplog.text  # in the log only
