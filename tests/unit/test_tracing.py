"""OpenTelemetry spans of the gateway's requests (serve/gateway/tracing.py), read back from the SDK's in-memory
exporter: one request span with the GenAI attributes and its parts in order under it; a refused request's
span says why; nothing without an OTLP endpoint."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from deploykit.serve.accounting.database import Database
from deploykit.serve.accounting.keys import create_key
from deploykit.serve.gateway.tracing import Tracer, from_environment
from tests.unit.gateway_support import chat, client_of

pytestmark = pytest.mark.anyio


def traced(app: FastAPI) -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app.state.gateway.tracer = Tracer(provider)
    return exporter


async def test_a_streamed_request_is_one_span_with_its_parts(make_app: Callable[..., FastAPI]) -> None:
    app = make_app(max_concurrent=2)
    exporter = traced(app)
    body = chat(max_tokens=6, stream=True)
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    caller = {"traceparent": f"00-{trace_id}-{parent_id}-01"}  # the client's own trace (W3C trace context)
    async with (
        client_of(app) as gateway,
        gateway.stream("POST", "/v1/chat/completions", json=body, headers=caller) as response,
    ):
        assert response.status_code == 200
        await response.aread()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    request = spans.pop("chat m1")
    assert set(spans) == {"admission", "queue", "engine", "stream", "ledger"}
    attributes = dict(request.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat" and attributes["gen_ai.provider.name"] == "vllm"
    assert attributes["gen_ai.request.model"] == "m1" and attributes["http.response.status_code"] == 200
    assert attributes["gen_ai.usage.output_tokens"] == 6 and attributes["gen_ai.usage.input_tokens"] > 0
    assert attributes["server.address"].startswith("http://127.0.0.1:")
    assert all(s.parent is not None and s.parent.span_id == request.context.span_id for s in spans.values())
    assert all(s.context.trace_id == request.context.trace_id for s in spans.values())
    assert f"{request.context.trace_id:032x}" == trace_id and f"{request.parent.span_id:016x}" == parent_id
    order = [spans[n] for n in ("admission", "queue", "engine", "stream", "ledger")]
    for earlier, later in itertools.pairwise(order):
        assert earlier.start_time <= later.start_time and earlier.end_time <= later.end_time  # type: ignore[operator]
    assert request.start_time <= order[0].start_time and order[-1].end_time <= request.end_time  # type: ignore[operator]


async def test_a_refused_request_says_why(make_app: Callable[..., FastAPI], db: Database) -> None:
    app = make_app(auth=True)
    exporter = traced(app)
    _, token = create_key(db, "team-a", models=["other"])
    async with client_of(app) as gateway:
        refused = await gateway.post("/v1/chat/completions", json=chat(), headers={"authorization": f"Bearer {token}"})
    assert refused.status_code == 403
    spans = {s.name: s for s in exporter.get_finished_spans()}
    span = spans.pop("chat m1")
    assert set(spans) == {"admission", "ledger"}  # refused on its key: no queue, engine or stream
    attributes = dict(span.attributes or {})
    assert attributes["http.response.status_code"] == 403 and attributes["deploykit.key"] == "team-a"
    assert attributes["error.type"] and not span.status.is_ok


def test_no_endpoint_no_tracer() -> None:
    assert from_environment({}) is None
    tracer = from_environment({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"})
    assert tracer is not None
    tracer.shutdown()


async def test_a_request_sampled_out_makes_no_span(
    make_app: Callable[..., FastAPI], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK's sampler from the environment (OTEL_TRACES_SAMPLER) decides; a dropped request costs no spans."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    app = make_app()
    exporter = traced(app)
    async with client_of(app) as gateway:
        assert (await gateway.post("/v1/chat/completions", json=chat(max_tokens=3))).status_code == 200
    assert exporter.get_finished_spans() == ()
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "1")
    exporter = traced(app)
    async with client_of(app) as gateway:
        assert (await gateway.post("/v1/chat/completions", json=chat(max_tokens=3))).status_code == 200
    assert {s.name for s in exporter.get_finished_spans()} >= {"chat m1", "admission", "ledger"}
