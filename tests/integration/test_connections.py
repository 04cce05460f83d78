"""The gateway's HTTP server against slow, huge and idle clients, over real sockets: headers are bounded in
size and time, idle connections are closed, and past the connection limit a client is told so at once."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from deploykit.serve.accounting.database import connect
from deploykit.serve.gateway import Backend, create_app
from deploykit.serve.gateway.app import GatewayOptions
from deploykit.serve.gateway.proxy import engine_session
from deploykit.serve.gateway.server import ConnectionLimits, server_config
from tests.fakes.threaded import serve_in_thread

LIMITS = ConnectionLimits(
    max_header_bytes=8 * 1024, header_timeout_s=1.0, idle_timeout_s=1.0, max_connections=8, body_timeout_s=1.0
)
REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"


@pytest.fixture(scope="module")
def gateway_port(tmp_path_factory: pytest.TempPathFactory, engine_url: str) -> Iterator[int]:
    db = connect(f"sqlite:///{tmp_path_factory.mktemp('conn') / 'deploykit.db'}")
    apps: list[FastAPI] = []

    async def build() -> FastAPI:
        backend = Backend("m1", engine_url, engine_session(), status="ready")
        apps.append(create_app([backend], db, GatewayOptions(body_timeout_s=LIMITS.body_timeout_s)))
        return apps[0]

    async def stop() -> None:
        await apps[0].state.gateway.router.replicas[0].session.close()
        apps[0].state.gateway.close()

    with serve_in_thread(build=build, on_stop=stop, limits=LIMITS) as url:
        yield int(url.rsplit(":", 1)[1])
    db.close()


def connect_to(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection (b"" when it closes without a word)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def refusal(answer: bytes) -> dict[str, object]:
    """The OpenAI-shaped error in a refusal the server wrote itself (it closes the connection after it)."""
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"\r\nconnection: close\r\n" in head + b"\r\n" and f"content-length: {len(body)}".encode() in head
    error: dict[str, object] = json.loads(body)["error"]
    return error


def error(message: str, code: str) -> dict[str, object]:
    return {"message": message, "type": "invalid_request_error", "param": None, "code": code}


def test_a_normal_request_with_a_large_body_in_one_write_passes(gateway_port: int) -> None:
    body = b'{"model": "m1", "max_tokens": 2, "messages": [{"role": "user", "content": "' + b"a" * 200_000 + b'"}]}'
    response = httpx.post(f"http://127.0.0.1:{gateway_port}/v1/chat/completions", content=body)
    assert response.status_code == 200, response.text


def test_headers_larger_than_the_limit_are_a_431(gateway_port: int) -> None:
    with connect_to(gateway_port) as sock:
        sock.sendall(REQUEST + b"x-big: " + b"a" * 20_000 + b"\r\ncontent-length: 2\r\n\r\n{}")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    message = "The request's headers are larger than this gateway's limit of 8,192 bytes."
    assert refusal(answer) == error(message, "headers_too_large")


def answer_to(sock: socket.socket) -> bytes:
    """One answer on a kept-alive connection: /health's, or a refusal (the server then closes)."""
    answer = b""
    while not answer.endswith(b'{"status":"ok"}') and (chunk := sock.recv(65536)):
        answer += chunk
    return answer


def test_headers_of_exactly_the_limit_pass_and_one_byte_more_is_a_431(gateway_port: int) -> None:
    # the limit counts the URL and, per header, its name, its value and 4 bytes (": " and CRLF)
    def head(pad: int) -> bytes:
        return b"GET /health HTTP/1.1\r\nHost: x\r\nx-pad: " + b"a" * pad + b"\r\n\r\n"

    at_limit = LIMITS.max_header_bytes - len("/health") - (len("Host") + len("x") + 4) - (len("x-pad") + 4)
    for pad, status in ((at_limit, 200), (at_limit + 1, 431)):
        with connect_to(gateway_port) as sock:
            sock.sendall(head(pad)[:8])  # the URL in two pieces: both count
            time.sleep(0.1)
            sock.sendall(head(pad)[8:])
            assert status_of(answer_to(sock)) == status, pad


def test_unfinished_headers_may_reach_the_limit_but_not_pass_it(gateway_port: int) -> None:
    # headers still arriving are counted as raw bytes: exactly the limit waits for more, one more is cut
    start = b"GET /health HTTP/1.1\r\nHost: x\r\nx-pad: "
    for extra, status in ((0, 200), (1, 431)):
        with connect_to(gateway_port) as sock:
            sock.sendall(start + b"a" * (LIMITS.max_header_bytes - len(start) + extra))
            time.sleep(0.2)  # its own read: the server sees headers that have not ended
            with contextlib.suppress(OSError):
                sock.sendall(b"\r\n\r\n")
            assert status_of(answer_to(sock)) == status, extra


def test_each_request_on_a_kept_alive_connection_has_its_own_header_limit(gateway_port: int) -> None:
    # three requests whose headers arrive in pieces: together over the limit, each well under it
    with connect_to(gateway_port) as sock:
        for _ in range(3):
            for piece in (b"GET /health HTTP/1.1\r\nHost: x\r\nx-pad: ", b"a" * 3000, b"\r\n\r\n"):
                sock.sendall(piece)
                time.sleep(0.05)
            assert status_of(answer_to(sock)) == 200


def test_a_header_that_never_ends_is_cut_after_the_limit_not_buffered(gateway_port: int) -> None:
    rss_before = psutil.Process().memory_info().rss
    sent = 0
    started = time.monotonic()
    with connect_to(gateway_port) as sock:
        # what `sent` counts beyond what the server read sits in the kernel's buffers; this side's is fixed
        # small (it grows to megabytes on its own while a busy machine keeps the server thread waiting)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        sock.sendall(REQUEST + b"x-endless: ")
        with pytest.raises(OSError):  # the server closes: writing more fails
            for _ in range(32 * 1024):  # up to 32 MB
                sock.sendall(b"a" * 1024)
                sent += 1024
        answer = read_all(sock)
    assert status_of(answer) in (431, 0)
    assert sent < 256 * 1024, "the server kept reading an endless header"
    assert time.monotonic() - started < LIMITS.header_timeout_s * 0.8  # cut by its size, not by the header timer
    assert psutil.Process().memory_info().rss - rss_before < 16 * 1024 * 1024


def test_a_connection_that_sends_nothing_is_closed(gateway_port: int) -> None:
    with connect_to(gateway_port) as sock:
        started = time.monotonic()
        assert read_all(sock) == b""
        assert time.monotonic() - started < LIMITS.header_timeout_s + 1


def test_headers_sent_a_byte_at_a_time_time_out_with_a_408(gateway_port: int) -> None:
    started = time.monotonic()
    with connect_to(gateway_port) as sock:
        try:
            for byte in REQUEST:
                sock.send(bytes([byte]))
                time.sleep(0.05)
        except OSError:
            pass
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert refusal(answer) == error("The request's headers did not arrive within 1 s.", "request_timeout")
    assert time.monotonic() - started < LIMITS.header_timeout_s + 1.5


def test_a_body_that_trickles_times_out_with_a_408(gateway_port: int) -> None:
    with connect_to(gateway_port) as sock:
        sock.sendall(REQUEST + b"content-length: 100\r\n\r\n{")
        answer = read_all(sock)
    assert status_of(answer) == 408 and b"request_timeout" in answer


def test_an_idle_kept_alive_connection_is_closed(gateway_port: int) -> None:
    with connect_to(gateway_port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while not first.endswith(b'{"status":"ok"}'):  # the head and the body may come in separate reads
            first += sock.recv(65536)
        assert status_of(first) == 200
        started = time.monotonic()
        assert read_all(sock) == b""  # closed by the server, not by us
        assert time.monotonic() - started < LIMITS.idle_timeout_s + 1


def test_past_the_connection_limit_a_client_gets_a_503_at_once(gateway_port: int) -> None:
    held = [connect_to(gateway_port) for _ in range(LIMITS.max_connections)]
    try:
        held[-1].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # the last one allowed is served
        assert status_of(answer_to(held[-1])) == 200
        with connect_to(gateway_port) as extra:
            answer = read_all(extra)
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        message = "The gateway has too many open connections; retry shortly."
        assert refusal(answer) == error(message, "too_many_connections")
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    assert httpx.get(f"http://127.0.0.1:{gateway_port}/health").status_code == 200  # room again


def test_many_slow_clients_do_not_stop_others_being_served(gateway_port: int, tmp_path: Path) -> None:
    stop = threading.Event()

    def slowloris() -> None:
        with connect_to(gateway_port) as sock:
            try:
                sock.sendall(REQUEST)
                while not stop.is_set():
                    sock.send(b"x")
                    time.sleep(0.2)
            except OSError:
                pass

    threads = [threading.Thread(target=slowloris) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.2)
        response = httpx.post(
            f"http://127.0.0.1:{gateway_port}/v1/chat/completions",
            json={"model": "m1", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert response.status_code == 200
    finally:
        stop.set()
        for t in threads:
            t.join(5)


def test_the_server_config_keeps_its_promises() -> None:
    """What `serve` gives uvicorn, each value a promise: the limited protocol, no websockets (the gateway
    speaks HTTP only), no lifespan, no Server header (nothing to fingerprint), kept-alive connections
    closed after the idle limit, and a graceful-shutdown backstop 5 s after the drain deadline."""
    limits = ConnectionLimits(idle_timeout_s=7.5)
    config = server_config(FastAPI(), limits, drain_timeout_s=30, host="127.0.0.1", port=1)
    assert (config.ws, config.lifespan, config.log_level, config.server_header) == ("none", "off", "warning", False)
    assert (config.timeout_keep_alive, config.timeout_graceful_shutdown) == (7, 35)
    assert issubclass(config.http, HttpToolsProtocol) and config.http.__name__ == "LimitedHttpProtocol"  # type: ignore[arg-type, union-attr]
    assert server_config(FastAPI(), ConnectionLimits(idle_timeout_s=0.2), drain_timeout_s=0).timeout_keep_alive == 1
