"""How a relayed stream ends when it does not end well, in-process over real HTTP (the gateway and a slow
fake engine each served from a thread): the client leaves, the gateway's drain deadline passes, the
engine dies mid-stream. Each gets its ledger row, an abort at the engine where one is running, and the
replica's count of outstanding requests back to zero. (tests/integration/test_lifecycle.py checks the
first two through `deploykit serve` as users start it.)"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploykit.serve.accounting.database import Database, connect
from deploykit.serve.gateway import Backend, create_app
from deploykit.serve.gateway.app import Gateway
from deploykit.serve.gateway.proxy import engine_session
from tests.fakes.threaded import raw_server, read_request_head, serve_in_thread

BODY = {"model": "m1", "prompt": "x", "max_tokens": 400, "stream": True}


class Served:
    """The gateway app served from a thread, with what its event loop holds."""

    def __init__(self, engine_url: str, db: Database) -> None:
        self.engine_url, self.db = engine_url, db
        self.url = ""  # the gateway's, once served
        self.gateway: Gateway | None = None
        self.backend: Backend | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def build(self) -> object:
        self.loop = asyncio.get_running_loop()
        self.backend = Backend("m1", self.engine_url, engine_session(), status="ready")
        app = create_app([self.backend], self.db)
        self.gateway = app.state.gateway
        return app

    async def close(self) -> None:
        assert self.backend is not None and self.gateway is not None
        await self.backend.session.close()
        self.gateway.close()

    def ledger(self) -> list[tuple[object, ...]]:
        return self.db.query("SELECT status, error, completion_tokens FROM requests")

    def wait_for(self, check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 10
        while not check():
            assert time.monotonic() < deadline, what
            time.sleep(0.02)


@pytest.fixture
def served(slow_engine_url: str, tmp_path: Path) -> Iterator[Served]:
    with _served_over(slow_engine_url, tmp_path) as served:
        yield served


def _engine_stats(url: str) -> dict[str, int]:
    stats: dict[str, int] = httpx.get(url + "/stats").json()
    return stats


def test_a_client_that_leaves_mid_stream_is_a_499_and_an_abort(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    before = _engine_stats(served.engine_url)
    with httpx.stream("POST", served.url + "/v1/completions", json=BODY, timeout=10) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
    served.wait_for(lambda: _engine_stats(served.engine_url)["aborted"] == before["aborted"] + 1, "no abort")
    served.wait_for(lambda: len(served.ledger()) == 1, "no ledger row")
    [(status, error, tokens)] = served.ledger()
    assert (status, error) == (499, "client disconnected") and 1 <= tokens < 400  # type: ignore[operator]
    assert served.backend is not None and served.backend.outstanding == 0
    assert _engine_stats(served.engine_url)["finished"] == before["finished"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text  # a client leaving is no error


def test_the_drain_deadline_cuts_a_stream_with_an_error_event_and_a_503(served: Served) -> None:
    before = _engine_stats(served.engine_url)
    events: list[str] = []
    with httpx.stream("POST", served.url + "/v1/completions", json=BODY, timeout=10) as response:
        lines = response.iter_lines()
        events += [next(lines) for _ in range(3)]
        assert served.loop is not None and served.gateway is not None
        started = time.monotonic()
        stopped = asyncio.run_coroutine_threadsafe(served.gateway.stop(timeout_s=5), served.loop)
        events += [line for line in lines if line]
        stopped.result(10)
        assert time.monotonic() - started < 2.5  # done when the last request ended, not at stop()'s bound
    last = json.loads(events[-1].removeprefix("data: "))
    assert last == {
        "error": {
            "message": "The gateway is shutting down; this answer was cut short.",
            "type": "server_error",
            "param": None,
            "code": "shutting_down",
        }
    }
    assert "data: [DONE]" not in events
    served.wait_for(lambda: _engine_stats(served.engine_url)["aborted"] == before["aborted"] + 1, "no abort")
    [(status, error, tokens)] = served.ledger()  # stop() committed it
    assert (status, error) == (503, "gateway shut down mid-stream") and 1 <= tokens < 400  # type: ignore[operator]
    assert served.backend is not None and served.backend.outstanding == 0


def test_the_drain_deadline_cuts_an_answer_still_awaited_with_a_503(served: Served) -> None:
    """A non-streamed answer sends nothing until the engine is done: at the deadline the client gets the
    shutting-down error in full, the engine an abort, the ledger its row."""
    before = _engine_stats(served.engine_url)
    answers: list[httpx.Response] = []
    client = threading.Thread(
        target=lambda: answers.append(httpx.post(served.url + "/v1/completions", json={**BODY, "stream": False}))
    )
    client.start()
    served.wait_for(lambda: _engine_stats(served.engine_url)["in_flight"] == before["in_flight"] + 1, "not sent")
    assert served.loop is not None and served.gateway is not None
    asyncio.run_coroutine_threadsafe(served.gateway.stop(timeout_s=5), served.loop).result(10)
    client.join(10)
    [answer] = answers
    assert answer.status_code == 503 and answer.json() == {
        "error": {
            "message": "The gateway is shutting down; the request was cut short.",
            "type": "service_unavailable",
            "param": None,
            "code": "shutting_down",
        }
    }
    served.wait_for(lambda: _engine_stats(served.engine_url)["aborted"] == before["aborted"] + 1, "no abort")
    assert [row[:2] for row in served.ledger()] == [(503, "shutting_down")]
    assert served.backend is not None and served.backend.outstanding == 0


@contextmanager
def _served_over(engine_url: str, tmp_path: Path) -> Iterator[Served]:
    db = connect(f"sqlite:///{tmp_path / 'deploykit.db'}")
    served = Served(engine_url, db)
    with serve_in_thread(build=served.build, on_stop=served.close) as url:
        served.url = url
        yield served
    db.close()


def _streams(
    *events: bytes, then_die: bool = False, keep_alive: bool = False
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """An engine that answers a request with these SSE events (chunked), then ends the body, or dies; kept
    alive, it answers each request that comes on the connection the same way."""

    async def answer_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # the gateway closed the connection
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        await reader.readexactly(int(length[1]) if length else 0)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for event in events:
            writer.write(b"%x\r\n%s\r\n" % (len(event) + 2, event + b"\n\n"))
        await writer.drain()
        await asyncio.sleep(0.1)
        if then_die:
            writer.transport.abort()
            return False
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await answer_one(reader, writer) and keep_alive:
            pass
        if not then_die:
            await reader.read()

    return answer


def test_an_engine_that_dies_mid_stream_is_an_error_event_and_a_502(tmp_path: Path) -> None:
    hello = b'data: {"choices": [{"index": 0, "text": "Hello"}]}'
    world = b'data: {"choices": [{"index": 0, "text": " world"}]}'
    with raw_server(_streams(hello, world, then_die=True)) as engine, _served_over(engine, tmp_path) as served:
        with httpx.stream("POST", served.url + "/v1/completions", json=BODY, timeout=10) as response:
            events = [line for line in response.iter_lines() if line]
        served.wait_for(lambda: len(served.ledger()) == 1, "no ledger row")
        [(status, message, tokens)] = served.ledger()
        assert served.backend is not None and served.backend.outstanding == 0
    assert events[:2] == [hello.decode(), world.decode()]
    error = json.loads(events[2].removeprefix("data: "))["error"]
    assert error["code"] == "engine_unavailable"
    assert error["message"] == "The engine stopped mid-stream (ClientPayloadError)."  # aiohttp's name for it
    assert (status, message, tokens) == (502, "engine stopped mid-stream (ClientPayloadError)", 2)


def test_a_stream_that_ends_without_done_is_relayed_and_noted(tmp_path: Path) -> None:
    hello = b'data: {"choices": [{"index": 0, "text": "Hello"}]}'
    with raw_server(_streams(hello)) as engine, _served_over(engine, tmp_path) as served:
        with httpx.stream("POST", served.url + "/v1/completions", json=BODY, timeout=10) as response:
            events = [line for line in response.iter_lines() if line]
        served.wait_for(lambda: len(served.ledger()) == 1, "no ledger row")
        assert served.ledger() == [(200, "stream ended without [DONE]", 1)]
    assert events == [hello.decode()]


def test_a_finished_stream_gives_its_engine_connection_back_for_the_next_request(tmp_path: Path) -> None:
    """Kept-alive engine connections: two streams one after the other travel on one connection."""
    connections: list[int] = []
    answer = _streams(b'data: {"choices": [{"index": 0, "text": "a"}]}', b"data: [DONE]", keep_alive=True)

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        await answer(reader, writer)

    with raw_server(counted) as engine, _served_over(engine, tmp_path) as served:
        for _ in range(2):
            with httpx.stream("POST", served.url + "/v1/completions", json=BODY, timeout=10) as response:
                assert [line for line in response.iter_lines() if line][-1] == "data: [DONE]"
        served.wait_for(lambda: len(served.ledger()) == 2, "no ledger rows")
    assert len(connections) == 1


def test_usage_is_read_wherever_the_engine_puts_it_and_odd_events_pass_untouched(tmp_path: Path) -> None:
    """Usage on a chunk that also carries text (vLLM's continuous usage stats) reaches the client even when
    the gateway strips usage-only chunks; a later usage without prompt_tokens keeps the earlier count; an
    event that mentions usage but is not JSON is relayed as it came."""
    first = b'data: {"choices": [{"index": 0, "text": "a"}], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}'
    odd = b'data: {"usage": not json'
    last = b'data: {"choices": [{"index": 0, "text": "b"}], "usage": {"prompt_tokens": null, "completion_tokens": 3}}'
    with raw_server(_streams(first, odd, last, b"data: [DONE]")) as engine, _served_over(engine, tmp_path) as served:
        with httpx.stream("POST", served.url + "/v1/completions", json=BODY, timeout=10) as response:
            events = [line for line in response.iter_lines() if line]
        served.wait_for(lambda: len(served.ledger()) == 1, "no ledger row")
        tokens = served.db.query("SELECT status, prompt_tokens, completion_tokens FROM requests")
    assert events == [first.decode(), odd.decode(), last.decode(), "data: [DONE]"]
    assert tokens == [(200, 5, 3)]


def test_concurrent_requests_are_counted_on_their_replica_until_each_ends(served: Served) -> None:
    with (
        httpx.stream("POST", served.url + "/v1/completions", json=BODY, timeout=10) as one,
        httpx.stream("POST", served.url + "/v1/completions", json=BODY, timeout=10) as two,
    ):
        lines = one.iter_lines(), two.iter_lines()  # kept: a discarded iterator closes its response
        assert all(next(each) for each in lines)
        assert served.backend is not None and served.backend.outstanding == 2
    served.wait_for(lambda: served.backend is not None and served.backend.outstanding == 0, "still outstanding")


def test_a_client_that_leaves_before_the_engine_answers_is_a_499_and_an_abort(served: Served) -> None:
    before = _engine_stats(served.engine_url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.url + "/v1/completions", json={**BODY, "stream": False}, timeout=0.3)
    served.wait_for(lambda: _engine_stats(served.engine_url)["aborted"] == before["aborted"] + 1, "no abort")
    served.wait_for(lambda: len(served.ledger()) == 1, "no ledger row")
    assert served.ledger() == [(499, "client disconnected", 0)]
    assert served.backend is not None and served.backend.outstanding == 0


def test_a_client_that_leaves_while_the_answer_arrives_is_a_499_and_a_closed_engine_connection(
    tmp_path: Path,
) -> None:
    """The engine sent its status and headers, the body is slow: the client leaving now is a 499 too, and
    the engine connection is closed (how vLLM learns to abort), not handed back to the pool."""
    closed = threading.Event()

    async def half_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{")
        await writer.drain()
        await reader.read()  # until the gateway closes the connection
        closed.set()

    with raw_server(half_answer) as engine, _served_over(engine, tmp_path) as served:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(served.url + "/v1/completions", json={**BODY, "stream": False}, timeout=0.5)
        assert closed.wait(5), "the engine connection was kept"
        served.wait_for(lambda: len(served.ledger()) == 1, "no ledger row")
        assert served.ledger() == [(499, "client disconnected", 0)]
        assert served.backend is not None and served.backend.outstanding == 0


def test_an_answer_without_a_content_type_goes_back_as_json(tmp_path: Path) -> None:
    body = b'{"choices": [{"index": 0, "text": "hi"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}'

    async def bare(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    with raw_server(bare) as engine, _served_over(engine, tmp_path) as served:
        answer = httpx.post(served.url + "/v1/completions", json={**BODY, "stream": False})
    assert answer.status_code == 200 and answer.content == body
    assert answer.headers["content-type"] == "application/json"


def test_inter_token_latency_is_measured_between_tokens(served: Served) -> None:
    with httpx.stream("POST", served.url + "/v1/completions", json={**BODY, "max_tokens": 10}, timeout=10) as r:
        r.read()
    text = httpx.get(served.url + "/metrics").text
    [family] = [f for f in text_string_to_metric_families(text) if f.name == "deploykit_inter_token_seconds"]
    count = next(s.value for s in family.samples if s.name.endswith("_count"))
    total = next(s.value for s in family.samples if s.name.endswith("_sum"))
    assert count == 9 and 0.01 < total / count < 0.2  # 20 ms a token from the slow engine
