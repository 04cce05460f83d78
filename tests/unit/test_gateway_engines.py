"""What the gateway makes of its engines beyond answers: their /metrics re-exported with a replica label
(read back by prometheus_client's own parser), an engine whose /metrics hangs or fails, an engine that is
gone when /version or /v1/models asks it, and the moving average of TTFT that spill-over decides on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploykit.core.errors import UsageError
from deploykit.serve.accounting.database import connect
from deploykit.serve.gateway import Backend, create_app
from deploykit.serve.gateway.metrics import GatewayMetrics
from deploykit.serve.gateway.proxy import engine_session
from deploykit.serve.gateway.routing import Model
from deploykit.serve.remote import RemoteEngine, RemoteWatch, parse_engine
from tests.fakes.engine import CONTEXT
from tests.fakes.threaded import nobody_listening, raw_server, read_request_head, serve_in_thread

ENGINE_METRICS = """# HELP vllm:num_requests_running Number of requests running.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m1"} 3.0
vllm:num_requests_waiting{model_name="m1"} 7.0
vllm:kv_cache_usage_perc{model_name="m1"} 0.25
vllm:num_preemptions_total 2.0
vllm:time_to_first_token_seconds_count{model_name="m1"} 9.0
"""


def _engine_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("vllm:")
    ]


def test_engine_metrics_are_re_exported_per_replica_and_parse_back() -> None:
    odd = 'm1 "b"\\n\ny'  # a replica label with a quote, a backslash (before an n) and a newline: read back
    text = GatewayMetrics().render([("m1-0", ENGINE_METRICS), (odd, ENGINE_METRICS)]).decode()
    assert text.endswith("\n")
    kept = [
        ("vllm:num_requests_running", {"model_name": "m1"}, 3.0),
        ("vllm:num_requests_waiting", {"model_name": "m1"}, 7.0),
        ("vllm:kv_cache_usage_perc", {"model_name": "m1"}, 0.25),
        ("vllm:num_preemptions_total", {}, 2.0),
    ]
    expected = [
        (name, {"replica": replica, **labels}, value) for replica in ("m1-0", odd) for name, labels, value in kept
    ]
    assert _engine_samples(text) == expected
    assert any(f.name == "deploykit_requests" for f in text_string_to_metric_families(text))  # ours come first


def test_a_model_s_recent_ttft_is_a_moving_average() -> None:
    model = Model("m1", [])
    assert model.recent_ttft_s is None
    model.observe_ttft(1.0)
    assert model.recent_ttft_s == 1.0  # the first answer sets it
    model.observe_ttft(3.0)
    assert model.recent_ttft_s == pytest.approx(1.2)  # then each moves it a tenth of the way
    model.observe_ttft(0.2, weight=0.5)
    assert model.recent_ttft_s == pytest.approx(0.7)


# engines that do not answer as they should


async def _never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # reads the request and waits, answering nothing, until the client closes


async def _fails(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request_head(reader)
    body = ENGINE_METRICS.encode()
    writer.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    writer.close()


@contextmanager
def _gateway(tmp_path: Path, engine_url: str) -> Iterator[str]:
    db = connect(f"sqlite:///{tmp_path / 'deploykit.db'}")
    held: dict[str, object] = {}

    async def build() -> object:
        held["session"] = session = engine_session()
        app = create_app([Backend("m1", engine_url, session, status="ready")], db)
        held["app"] = app
        return app

    async def close() -> None:
        await held["session"].close()  # type: ignore[attr-defined]
        held["app"].state.gateway.close()  # type: ignore[attr-defined]

    with serve_in_thread(build=build, on_stop=close) as url:
        yield url
    db.close()


@pytest.mark.parametrize("answer", [_never, _fails], ids=["hangs", "fails"])
def test_an_engine_whose_metrics_hang_or_fail_is_left_out_of_the_scrape(
    tmp_path: Path, answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
) -> None:
    with raw_server(answer) as engine_url, _gateway(tmp_path, engine_url) as url:
        started = time.monotonic()
        response = httpx.get(url + "/metrics", timeout=10)
        assert response.status_code == 200 and time.monotonic() - started < 5  # a 2 s bound per engine
        assert _engine_samples(response.text) == []
        assert "deploykit_requests" in response.text


def test_an_engine_that_is_gone_is_a_503_that_names_its_model(tmp_path: Path) -> None:
    gone = nobody_listening()
    with _gateway(tmp_path, gone) as url:
        for path in ("/version", "/v1/models"):
            response = httpx.get(url + path, timeout=10)
            assert response.status_code == 503
            assert response.json()["error"] == {
                "message": "The engine for 'm1' did not answer (ClientConnectorError); it may have stopped.",
                "type": "service_unavailable",
                "param": None,
                "code": "engine_unavailable",
            }


@pytest.mark.anyio
async def test_a_remote_engine_is_ready_with_its_context_while_it_answers_its_health_check(engine_url: str) -> None:
    """`serve --engine NAME=URL` watches engines it did not start: ready (with the context length its
    /v1/models lists, for the token budget) while /health answers 200, stopped while it does not."""
    warnings: list[str] = []

    class Events:
        def warn(self, message: str) -> None:
            warnings.append(message)

    gone = nobody_listening()
    async with engine_session() as session, httpx.AsyncClient(timeout=2) as probe:
        up, down = Backend("m1", engine_url, session), Backend("m1", gone, session, status="ready")
        watch = RemoteWatch([up, down], Events())  # type: ignore[arg-type]
        assert await watch.step(probe) is None
        assert (up.status, up.context, down.status) == ("ready", CONTEXT, "stopped")
        assert warnings == [
            f"The engine for m1 at {engine_url} is ready.",
            f"The engine for m1 at {gone} fails its health check; requests go to its other replicas (or get 503) "
            "until it is back.",
        ]
        assert await watch.step(probe) is None and len(warnings) == 2  # said once, not at every look
        watch.stop_all()
        assert up.status == down.status == "stopped"


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("m1=http://engine-0:8000/", RemoteEngine("m1", "http://engine-0:8000")),
        ("m1=https://e", RemoteEngine("m1", "https://e")),
    ],
)
def test_engine_specs(spec: str, parsed: RemoteEngine) -> None:
    assert parse_engine(spec) == parsed
    for bad in ("m1", "=http://e", "m1=e:8000", "m1=ftp://e"):
        with pytest.raises(UsageError, match="is not NAME=URL"):
            parse_engine(bad)
