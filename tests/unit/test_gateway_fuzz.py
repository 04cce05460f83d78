"""Fuzz the gateway from its own OpenAPI document (schemathesis): malformed or odd requests never get a
5xx and never crash it. The fake engine answers whatever gets through."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
from tests.fakes.engine import create_fake_engine


def build_app(home: Path) -> Iterator[FastAPI]:
    engine = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_fake_engine("m1")), base_url="http://e")
    db = connect(f"sqlite:///{home / 'fuzz.db'}")
    app = create_app([Backend("m1", engine, status="ready")], db, GatewayOptions(max_tokens=64, max_body_bytes=65536))
    yield app
    app.state.gateway.close()
    db.close()


@pytest.fixture(scope="module")
def gateway_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    yield from build_app(tmp_path_factory.mktemp("fuzz"))


def test_no_request_gets_a_server_error(gateway_app: FastAPI) -> None:
    # schemathesis' pytest plugin does not run on pytest 9; its strategies run under hypothesis directly.
    # Bodies come both valid (positive) and broken on purpose (negative: wrong types, missing fields).
    schema = schemathesis.openapi.from_asgi("/openapi.json", gateway_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/chat/completions", "POST /v1/embeddings", "GET /metrics"}
    for operation in operations:
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.method == "post" else [])
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def fuzz(case: schemathesis.Case) -> None:
                case.call_and_validate(checks=[not_a_server_error])

            fuzz()


def test_the_schema_describes_the_bodies_and_the_served_models(gateway_app: FastAPI) -> None:
    document = gateway_app.openapi()
    chat = document["components"]["schemas"]["ChatCompletionRequest"]
    assert chat["properties"]["model"]["enum"] == ["m1"]
    assert {"messages", "model"} <= set(chat["required"])
    assert "requestBody" in document["paths"]["/v1/embeddings"]["post"]
