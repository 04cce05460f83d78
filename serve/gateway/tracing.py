"""OpenTelemetry traces of the gateway's requests, with the GenAI semantic conventions, exported over OTLP
when OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set; without it nothing is
imported and nothing is done.

A request's spans are made when it has ended, from the times its Exchange keeps anyway, so the request's
own path does no tracing work: the request span "{operation} {model}" (chat, text_completion, embeddings)
from its arrival to its end, and under it, where they happened, `admission` (body read, key checked, quota
taken), `queue` (a slot under --max-concurrent-streams), `engine` (forwarded to the first content event:
the engine's TTFT as the gateway sees it), `stream` (first to last content event) and `ledger` (its row
committed); a request that carries a W3C `traceparent` is a span of the client's trace. Attributes:
gen_ai.operation.name, gen_ai.provider.name (vllm, or the managed endpoint a request spilled to),
gen_ai.request.model, gen_ai.usage.input_tokens / output_tokens, server.address (the replica),
http.response.status_code, error.type, and deploykit.key (the key's name).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from deploykit.core.errors import MissingDependencyError

if TYPE_CHECKING:
    from deploykit.serve.gateway.exchange import Exchange

_OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion", "/v1/embeddings": "embeddings"}


class Tracer:
    """Spans for ended requests, through an OpenTelemetry tracer provider."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("deploykit.gateway")

    def record(self, x: Exchange, status: int, error: str | None, ended: float, committed: float | None) -> None:
        """The spans of one request; times are time.monotonic() seconds, as the Exchange keeps them."""
        from opentelemetry import trace
        from opentelemetry.propagate import extract

        offset = time.time_ns() - time.monotonic_ns()

        def ns(t: float) -> int:
            return int(t * 1e9) + offset

        operation = _OPERATIONS.get(x.endpoint, x.endpoint)
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": _provider(x),
            "gen_ai.request.model": x.model,
            "http.response.status_code": status,
        }
        if x.prompt_tokens is not None:
            attributes["gen_ai.usage.input_tokens"] = x.prompt_tokens
        if x.completion_tokens is not None:
            attributes["gen_ai.usage.output_tokens"] = x.completion_tokens
        if x.replica:
            attributes["server.address"] = x.replica
        if x.key is not None:
            attributes["deploykit.key"] = x.key.name
        if error:
            attributes["error.type"] = error
        start = x.arrived if x.arrived is not None else x.started
        end = committed if committed is not None else ended
        # a client that sent its trace context (traceparent) sees the request inside its own trace
        parent = extract({"traceparent": x.traceparent}) if x.traceparent else None
        span = self.tracer.start_span(
            f"{operation} {x.model}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            start_time=ns(start),
            attributes=attributes,
        )
        if not span.is_recording():  # sampled out (OTEL_TRACES_SAMPLER): nothing more to make
            return
        if error:
            span.set_status(trace.Status(trace.StatusCode.ERROR, error))
        forwarded = x.queued if x.queued is not None else x.started
        parts = [
            ("admission", start, x.started),
            ("queue", x.started, x.queued),
            ("engine", forwarded, x.first_content),
            ("stream", x.first_content, x.last_content),
            ("ledger", ended, committed),
        ]
        within = trace.set_span_in_context(span)
        for name, begin, finish in parts:
            if begin is not None and finish is not None and finish >= begin:
                child = self.tracer.start_span(name, context=within, start_time=ns(begin))
                child.end(end_time=ns(finish))
        span.end(end_time=ns(end))

    def shutdown(self) -> None:
        """Export what is still batched."""
        self.provider.shutdown()


def _provider(x: Exchange) -> str:
    if x.spill is None:
        return "vllm"
    return "azure.ai.openai" if x.spill.azure else "openai"


def from_environment(environ: Mapping[str, str] = os.environ) -> Tracer | None:
    """A tracer exporting over OTLP (HTTP, the exporter's own OTEL_* settings) when an endpoint is set."""
    if not (environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as e:
        raise MissingDependencyError(
            "An OTLP endpoint is set (OTEL_EXPORTER_OTLP_ENDPOINT) but OpenTelemetry is not installed.",
            "pip install 'deploykit[otel]', or unset the endpoint.",
        ) from e

    name = environ.get("OTEL_SERVICE_NAME") or "deploykit-gateway"
    # no sampler given: the SDK's own from OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (default: every request)
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return Tracer(provider)
