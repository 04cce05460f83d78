"""Fuzz the gateway, served as `deploykit serve` serves it (its connection limits), from its own OpenAPI
document (schemathesis), and with bodies nested up to and past its depth bound and headers larger than
its limit: malformed or odd requests never get a 5xx and never crash it. The fake engine answers whatever
gets through."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from deploykit.serve.accounting.database import connect
from deploykit.serve.gateway import Backend, create_app
from deploykit.serve.gateway.app import GatewayOptions
from deploykit.serve.gateway.proxy import MAX_JSON_DEPTH, engine_session
from deploykit.serve.gateway.server import ConnectionLimits
from tests.fakes.threaded import serve_in_thread


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory: pytest.TempPathFactory, engine_url: str) -> Iterator[str]:
    """The gateway over real HTTP, in front of the fake engine, with a max_tokens and a body limit."""
    db = connect(f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'fuzz.db'}")
    backends: list[Backend] = []

    async def build() -> FastAPI:
        backends.append(Backend("m1", engine_url, engine_session(), status="ready"))
        return create_app(backends, db, GatewayOptions(max_tokens=64, max_body_bytes=65536))

    async def stop() -> None:
        await backends[0].session.close()

    with serve_in_thread(build=build, on_stop=stop, limits=ConnectionLimits()) as url:
        yield url
    db.close()


def test_no_request_gets_a_server_error(gateway_url: str) -> None:
    # schemathesis' pytest plugin does not run on pytest 9; its strategies run under hypothesis directly.
    # Bodies come both valid (positive) and broken on purpose (negative: wrong types, missing fields).
    schema = schemathesis.openapi.from_url(f"{gateway_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/chat/completions", "POST /v1/embeddings", "GET /metrics"}
    for operation in operations:
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.method == "post" else [])
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def fuzz(case: schemathesis.Case) -> None:
                case.call_and_validate(base_url=gateway_url, checks=[not_a_server_error])

            fuzz()


def test_the_schema_describes_the_bodies_and_the_served_models(gateway_url: str) -> None:
    document = httpx.get(f"{gateway_url}/openapi.json").json()
    chat = document["components"]["schemas"]["ChatCompletionRequest"]
    assert chat["properties"]["model"]["enum"] == ["m1"]
    assert {"messages", "model"} <= set(chat["required"])
    assert "requestBody" in document["paths"]["/v1/embeddings"]["post"]
    audio = document["paths"]["/v1/audio/transcriptions"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert audio["schema"]["properties"]["model"]["enum"] == ["m1"] and audio["schema"]["required"] == ["file", "model"]


@given(
    depth=st.integers(1, 60_000),
    opener=st.sampled_from(["[", '{"a":', '{"model": "m1", "messages": [', '{"model": "m1", "prompt": [']),
    closed=st.booleans(),
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]),
)
@settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_deeply_nested_bodies_are_refused_not_crashed_on(
    gateway_url: str, depth: int, opener: str, closed: bool, path: str
) -> None:
    closer = {"[": "]", '{"a":': "}"}.get(opener, "]}")
    body = opener * depth + ("0" + closer * depth if closed else "")
    response = httpx.post(gateway_url + path, content=body.encode(), timeout=30)
    assert response.status_code < 500, response.text[:300]
    levels = depth * (2 if opener.startswith('{"model"') else 1)
    if levels > MAX_JSON_DEPTH or not closed:
        assert response.status_code in (400, 413), response.text[:300]  # refused; 413 when also too large


@given(
    size=st.integers(1, 300_000),
    count=st.integers(1, 40),
    name=st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=40),
)
@settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_huge_headers_are_refused_not_crashed_on(gateway_url: str, size: int, count: int, name: str) -> None:
    headers = [(f"x-{name}-{i}", "a" * (size // count)) for i in range(count)]
    try:
        response = httpx.post(
            gateway_url + "/v1/chat/completions",
            json={"model": "m1", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
            headers=headers,
            timeout=30,
        )
    except httpx.TransportError:
        return  # the server closed on a header it would not read to the end: refused, not crashed
    limit = ConnectionLimits().max_header_bytes
    expected = (200,) if size < limit // 2 else (431,) if size > limit else (200, 431)
    assert response.status_code in expected, response.text[:300]
    assert httpx.get(gateway_url + "/health").status_code == 200
