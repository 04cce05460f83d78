"""Fuzz the gateway from its own OpenAPI document (schemathesis): malformed or odd requests never get a
5xx and never crash it. The fake engine answers whatever gets through."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from deploykit.serve.gateway import Backend, create_app
from deploykit.serve.gateway.app import GatewayOptions
from deploykit.serve.gateway.database import connect
from deploykit.serve.gateway.proxy import engine_session
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

    with serve_in_thread(build=build, on_stop=stop) as url:
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
