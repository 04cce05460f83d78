"""How a relayed stream ends when it does not end well, in-process over real HTTP (the gateway and a slow
fake engine each served from a thread): the client leaves, the gateway's drain deadline passes, the
engine dies mid-stream. Each gets its ledger row, an abort at the engine where one is running, and the
replica's count of outstanding requests back to zero. (tests/integration/test_lifecycle.py checks the
first two through `deploykit serve` as users start it.)"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from deploykit.serve.accounting.database import Database, connect
from deploykit.serve.gateway import Backend, create_app
from deploykit.serve.gateway.app import Gateway
from deploykit.serve.gateway.proxy import engine_session
from tests.fakes.threaded import serve_in_thread

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
    db = connect(f"sqlite:///{tmp_path / 'deploykit.db'}")
    served = Served(slow_engine_url, db)
    with serve_in_thread(build=served.build, on_stop=served.close) as url:
        served.url = url
        yield served
    db.close()


def _engine_stats(url: str) -> dict[str, int]:
    stats: dict[str, int] = httpx.get(url + "/stats").json()
    return stats


def test_a_client_that_leaves_mid_stream_is_a_499_and_an_abort(served: Served) -> None:
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


def test_the_drain_deadline_cuts_a_stream_with_an_error_event_and_a_503(served: Served) -> None:
    before = _engine_stats(served.engine_url)
    events: list[str] = []
    with httpx.stream("POST", served.url + "/v1/completions", json=BODY, timeout=10) as response:
        lines = response.iter_lines()
        events += [next(lines) for _ in range(3)]
        assert served.loop is not None and served.gateway is not None
        stopped = asyncio.run_coroutine_threadsafe(served.gateway.stop(timeout_s=5), served.loop)
        events += [line for line in lines if line]
        stopped.result(10)
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


async def _dies_after_two_events(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An engine that answers a stream with two events, then its process dies (the socket closes mid-body)."""
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    for text in ("Hello", " world"):
        event = f'data: {{"choices": [{{"index": 0, "text": "{text}"}}]}}\n\n'.encode()
        writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.transport.abort()


def test_an_engine_that_dies_mid_stream_is_an_error_event_and_a_502(tmp_path: Path) -> None:
    db = connect(f"sqlite:///{tmp_path / 'deploykit.db'}")
    holder: dict[str, asyncio.AbstractServer] = {}

    async def start() -> str:
        holder["server"] = await asyncio.start_server(_dies_after_two_events, "127.0.0.1", 0)
        return f"http://127.0.0.1:{holder['server'].sockets[0].getsockname()[1]}"

    engine_loop = asyncio.new_event_loop()
    threading.Thread(target=engine_loop.run_forever, daemon=True).start()
    engine_url = asyncio.run_coroutine_threadsafe(start(), engine_loop).result(5)
    served = Served(engine_url, db)
    try:
        with serve_in_thread(build=served.build, on_stop=served.close) as url:
            with httpx.stream("POST", url + "/v1/completions", json=BODY, timeout=10) as response:
                events = [line for line in response.iter_lines() if line]
            served.wait_for(lambda: len(served.ledger()) == 1, "no ledger row")
    finally:
        engine_loop.call_soon_threadsafe(engine_loop.stop)
    assert events[:2] == [
        'data: {"choices": [{"index": 0, "text": "Hello"}]}',
        'data: {"choices": [{"index": 0, "text": " world"}]}',
    ]
    error = json.loads(events[2].removeprefix("data: "))["error"]
    assert error["code"] == "engine_unavailable" and error["message"].startswith("The engine stopped mid-stream (")
    [(status, message, tokens)] = served.ledger()
    assert status == 502 and str(message).startswith("engine stopped mid-stream (") and tokens == 2
    assert served.backend is not None and served.backend.outstanding == 0
    db.close()
