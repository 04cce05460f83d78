"""One load-test request, timed, against servers whose schedule is known (the synthetic SSE server, the fake
engine): every event with its tokens, every error class, the retry of a stale keep-alive connection, and
the request bodies. In this process (request.py imports no locust), so that each check sees the code."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI

from deploykit.core.errors import UsageError
from deploykit.loadtests.config import LoadTestConfig
from deploykit.loadtests.request import (
    Endpoint,
    discover_model,
    engine_version,
    load_token_counter,
    request_body,
    send,
    spread,
)
from deploykit.loadtests.workload import Prompt
from deploykit.serve.accounting.database import connect
from deploykit.serve.accounting.keys import create_key
from deploykit.serve.gateway import Backend, create_app
from deploykit.serve.gateway.app import GatewayOptions
from deploykit.serve.gateway.proxy import engine_session
from tests.fakes.engine import ANSWER, PROMPT_TOKENS, create_fake_engine
from tests.fakes.hub import minilm_snapshot
from tests.fakes.sse_server import GAP_S, ROLE_S, TTFT_S, chunk_plan, serve_sse
from tests.fakes.threaded import serve_in_thread


@pytest.fixture
def sse() -> Iterator[str]:
    """A fresh synthetic server per test: its request counter (which picks the "errors" faults) starts at 0."""
    server = serve_sse()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def engine() -> Iterator[str]:
    with serve_in_thread(create_fake_engine("m1")) as url:
        yield url


def config(url: str, model: str = "synth", **changes: object) -> LoadTestConfig:
    return LoadTestConfig(url=url, model=model, concurrency=1, **changes)  # type: ignore[arg-type]


def ask(url: str, model: str = "synth", tokens: int = 20, count=None, **changes: object):  # type: ignore[no-untyped-def]
    cfg = config(url, model, **changes)
    endpoint = Endpoint(url, cfg.timeout_s)
    scheduled = time.monotonic()
    record = send(endpoint, cfg, request_body(cfg, Prompt("hi", tokens)), scheduled, count)
    return record, endpoint, scheduled


def test_a_stream_is_timed_event_by_event_with_exact_tokens(sse: str) -> None:
    record, _, scheduled = ask(sse)
    plan = chunk_plan(20)
    assert (record.status, record.error, record.usage_reported, record.counted_by) == (200, None, True, "server")
    assert [k for _, k in record.events] == plan  # running usage gives each event's tokens
    assert (record.output_tokens, record.input_tokens) == (20, 7)
    assert record.scheduled == scheduled <= record.sent <= record.headers_at <= record.events[0][0] <= record.end
    assert abs(record.ttft - TTFT_S) < 0.01  # the role-only chunk at 5 ms is not the first token
    gaps = [b[0] - a[0] for a, b in zip(record.events, record.events[1:], strict=False)]
    assert all(abs(g - GAP_S) < 0.01 for g in gaps) and record.headers_at - record.sent < ROLE_S + 0.01


def test_without_the_servers_usage_tokens_are_counted_and_flagged(sse: str) -> None:
    by_event, _, _ = ask(sse, "nousage")
    plan = chunk_plan(20)
    assert [k for _, k in by_event.events] == [1] * len(plan)  # the last resort: one token an event
    assert (by_event.usage_reported, by_event.counted_by, by_event.output_tokens) == (False, "events", len(plan))
    words, _, _ = ask(sse, "nousage", count=lambda text: len(text.split()))
    assert [k for _, k in words.events] == plan and words.output_tokens == 20  # " x" * k: k words
    assert (words.counted_by, words.error) == ("tokenizer", None)
    empty, _, _ = ask(sse, "nousage", count=lambda text: 0)
    assert [k for _, k in empty.events] == [1] * len(plan)  # an event counts at least one token


def test_every_error_has_its_class(sse: str) -> None:
    records = [ask(sse, "errors", tokens=10)[0] for _ in range(10)]
    classes = [r.error for r in records]
    assert classes == [None, None, None, "429", None, "5xx", None, "cut", None, None]
    assert records[3].retry_after == 2.0 and records[3].status == 429 and records[5].status == 500
    assert len(records[7].events) == 3 and records[7].headers_at is not None
    assert all(r.retry_after is None for i, r in enumerate(records) if i != 3)


def test_a_connection_refused_is_connect_and_a_slow_server_is_timeout(sse: str) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    refused, endpoint, _ = ask(f"http://127.0.0.1:{port}")
    assert (refused.error, refused.status, refused.headers_at) == ("connect", None, None)
    slow, endpoint, _ = ask(sse, timeout_s=0.02)  # the first token comes after 50 ms
    assert slow.error == "timeout" and endpoint._conn is None  # reopened after any error


def test_a_stale_keep_alive_connection_is_reopened_once(sse: str) -> None:
    cfg = config(sse)
    endpoint = Endpoint(sse, cfg.timeout_s)
    first = send(endpoint, cfg, request_body(cfg, Prompt("hi", 5)), time.monotonic())
    assert first.error is None and not endpoint.reused
    conn = endpoint._conn
    assert conn is not None and conn.sock is not None
    conn.sock.close()  # as a server closes an idle connection
    second = send(endpoint, cfg, request_body(cfg, Prompt("hi", 5)), time.monotonic())
    assert second.error is None and second.output_tokens == 5 and not endpoint.reused


def test_a_whole_answer_is_one_event_with_the_reported_usage(engine: str) -> None:
    record, _, _ = ask(engine, "m1", tokens=6, stream=False, vllm=False)
    assert (record.status, record.error, record.usage_reported) == (200, None, True)
    assert (record.output_tokens, record.input_tokens) == (6, PROMPT_TOKENS)
    assert len(record.events) == 1 and record.events[0][1] == 6 and record.events[0][0] <= record.end
    wrong, _, _ = ask(engine, "nope", stream=False)
    assert (wrong.status, wrong.error) == (404, "4xx")


def test_completions_streams_are_read_from_their_text(engine: str) -> None:
    record, _, _ = ask(engine, "m1", tokens=6, api="completions", vllm=False)
    assert (record.error, record.output_tokens, len(record.events)) == (None, 6, 6)
    assert record.usage_reported and record.input_tokens == PROMPT_TOKENS


def test_request_bodies() -> None:
    prompt = Prompt("Capital of France?", 12)
    chat = request_body(config("http://x"), prompt)
    assert chat == {
        "model": "synth",
        "max_tokens": 12,
        "stream": True,
        "messages": [{"role": "user", "content": "Capital of France?"}],
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "ignore_eos": True,
        "temperature": 0.0,
    }
    plain = request_body(config("http://x", api="completions", vllm=False, stream=False, temperature=None), prompt)
    assert plain == {"model": "synth", "max_tokens": 12, "stream": False, "prompt": "Capital of France?"}
    managed = request_body(config("http://x", vllm=False, temperature=0.7), prompt)
    assert managed["stream_options"] == {"include_usage": True} and "ignore_eos" not in managed
    assert managed["temperature"] == 0.7


def test_paths_and_headers_for_openai_and_azure() -> None:
    assert config("http://x").path() == "/v1/chat/completions"
    assert config("http://x/v1/", api="completions").path() == "/completions"
    azure = config("https://r.openai.azure.com", azure_deployment="mini", api_key="k")
    assert azure.path() == "/openai/deployments/mini/chat/completions?api-version=2024-10-21"
    assert azure.headers() == {"api-key": "k"}
    assert config("http://x", api_key="k").headers() == {"Authorization": "Bearer k"}
    assert config("http://x").headers() == {}
    endpoint = Endpoint("https://example.com:8443/base/", 5.0)
    assert (endpoint.https, endpoint.host, endpoint.port, endpoint.base) == (True, "example.com", 8443, "/base")
    assert Endpoint("http://example.com", 5.0).port == 80 and Endpoint("https://example.com", 5.0).port == 443


def test_engine_version_and_model_discovery(engine: str) -> None:
    assert engine_version(engine) == "0.0.0-fake" and engine_version(engine + "/v1", "a-key") == "0.0.0-fake"
    assert discover_model(engine, None) == "m1" and discover_model(engine + "/v1", "k") == "m1"
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}"
    assert engine_version(down) is None
    with pytest.raises(UsageError, match="Could not list the models") as e:
        discover_model(down, None)
    assert e.value.hint == "Pass --model."


@contextlib.contextmanager
def scripted(*writes: bytes, pause_s: float = 0.05, heads: list[bytes] | None = None) -> Iterator[str]:
    """A server that answers one request with these writes, `pause_s` apart, then closes: the exact bytes
    and boundaries the load tester must parse (events split across reads, several in one read, comments)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            head, body = request.split(b"\r\n\r\n", 1)
            if heads is not None:
                heads.append(head)
            length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))[15:])
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
            for chunk in writes:
                time.sleep(pause_s)
                conn.sendall(chunk)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        thread.join(10)
        listener.close()


def event(data: object) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def delta(text: str) -> bytes:
    return event({"choices": [{"delta": {"content": text}}]})


def test_events_are_parsed_across_read_boundaries_with_comments_and_no_space() -> None:
    split = delta(" world")
    writes = (
        event({"choices": [{"delta": {"role": "assistant"}}]}),
        b": keep-alive\n\n" + b'data:{"choices": [{"delta": {"content": "Hel"}}]}\n\n',  # a comment, then no space
        delta("lo") + delta(","),  # two events in one read
        split[:20],  # one event in two reads: it arrives with its second half
        split[20:],
        event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4}}),
        b"data: [DONE]\n\n",
    )
    with scripted(*writes) as url:
        record, _, scheduled = ask(url)
    assert record.error is None and record.status == 200
    assert [k for _, k in record.events] == [1, 1, 1, 1]  # Hel, lo, ",", " world"
    times = [t - scheduled for t, _ in record.events]
    assert times[1] == times[2]  # read together
    assert 0.09 <= times[0] < times[1] < times[3] and times[3] - times[1] >= 0.09  # the split one: two pauses later
    assert (record.output_tokens, record.input_tokens, record.usage_reported) == (4, 7, True)
    assert record.counted_by == "server"  # the total agrees with the events: nothing to spread


def test_a_reported_zero_is_zero_and_a_stream_without_done_is_cut() -> None:
    writes = (
        delta(""),
        event({"choices": [], "usage": {"prompt_tokens": 0, "completion_tokens": 0}}),
        b"data: [DONE]\n\n",
    )
    with scripted(*writes, pause_s=0.01) as url:
        record, _, _ = ask(url)
    assert (record.error, record.events, record.output_tokens, record.input_tokens) == (None, [], 0, 0)
    assert record.usage_reported
    with scripted(delta("a"), delta("b"), pause_s=0.01) as url:
        record, _, _ = ask(url)
    assert record.error == "cut" and len(record.events) == 2
    assert (record.output_tokens, record.usage_reported, record.counted_by) == (2, False, "events")


def test_discovery_and_version_send_the_key(engine: str, tmp_path: Path) -> None:
    """Against the deploykit gateway with keys on: without the key, no model list and no version."""
    db = connect(f"sqlite:///{tmp_path / 'deploykit.db'}")
    _, token = create_key(db, "loadtest")

    backends: list[Backend] = []

    async def build() -> FastAPI:
        backends.append(Backend("m1", engine, engine_session(), status="ready"))
        return create_app(backends, db, GatewayOptions(auth=True))

    async def stop() -> None:
        await backends[0].session.close()

    with serve_in_thread(build=build, on_stop=stop) as url:
        assert discover_model(url, token) == "m1" and discover_model(url + "/v1/", token) == "m1"
        with pytest.raises(UsageError, match="Could not list the models"):
            discover_model(url, None)
        assert engine_version(url, None) is None
        assert engine_version(url + "/v1/", token) is not None
    db.close()


def test_a_usage_total_at_the_end_is_spread_over_the_events_it_counts(sse: str) -> None:
    """OpenAI and Azure send usage only in the last chunk: each event's tokens are then the total spread by
    the events' text, so tokens by arrival, per-token ITL and TPOT agree with the server's usage."""
    plan = chunk_plan(20)
    record, _, _ = ask(sse, "lastusage")
    assert (record.usage_reported, record.counted_by, record.output_tokens) == (
        True,
        "server total, spread by text",
        20,
    )
    assert [k for _, k in record.events] == plan  # an event of "x" * k gets k of the 20
    assert len(record.itl()) == 20 - plan[0]  # per token, not per event
    words, _, _ = ask(sse, "lastusage", count=lambda text: 3)  # a tokenizer that says 3 for every event
    assert words.counted_by == "server total, spread by tokenizer" and sum(k for _, k in words.events) == 20


def test_a_reasoning_model_s_thinking_is_output_and_its_first_token_the_first(sse: str) -> None:
    record, _, _ = ask(sse, "reasoning", api="chat")
    plan = chunk_plan(20)
    assert record.reasoning and record.output_tokens == 20 and len(record.events) == len(plan)
    assert abs(record.ttft - TTFT_S) < 0.01  # the first thinking token
    answer_starts = len(plan) // 2
    assert record.first_answer == record.events[answer_starts][0]
    assert abs(record.ttft_answer - (TTFT_S + answer_starts * GAP_S)) < 0.01
    plain, _, _ = ask(sse, "lastusage", api="chat")
    assert not plain.reasoning and plain.ttft_answer is None


def test_an_event_over_several_lines_with_other_fields_is_one_event() -> None:
    """SSE allows `id:` and `event:` lines beside `data:`, and one event's data over several `data:` lines."""
    writes = (
        b'id: 1\nevent: message\ndata: {"choices": [{"delta":\ndata: {"content": "Hi"}}]}\n\n',
        event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}),
        b"data: [DONE]\n\n",
    )
    with scripted(*writes, pause_s=0.01) as url:
        record, _, _ = ask(url)
    assert (record.error, [k for _, k in record.events], record.output_tokens) == (None, [1], 1)


def test_an_error_event_cuts_the_request_and_what_follows_it_is_still_read() -> None:
    """vLLM ends a failed stream with an error event and then [DONE]: the request is cut, not ok."""
    error = event({"error": {"message": "engine died", "type": "InternalServerError"}})
    usage = event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
    with scripted(delta("a"), error + usage + b"data: [DONE]\n\n", pause_s=0.01) as url:
        record, _, _ = ask(url)
    assert (record.error, record.output_tokens, record.usage_reported) == ("cut", 1, True)


def test_a_whole_answer_without_usage_counts_nothing_it_was_not_told() -> None:
    answer = {"choices": [{"message": {"role": "assistant", "content": "Paris."}}]}
    with scripted(json.dumps(answer).encode(), pause_s=0.01) as url:
        record, _, _ = ask(url, stream=False)
    assert (record.error, record.usage_reported, record.output_tokens, record.input_tokens) == (None, False, 0, 0)


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_a_whole_answer_s_text_is_kept_for_the_next_turn(engine: str, api: str) -> None:
    cfg = config(engine, "m1", stream=False, api=api)
    answer: list[str] = []
    record = send(Endpoint(engine, 5.0), cfg, request_body(cfg, Prompt("hi", 6)), time.monotonic(), None, answer)
    assert record.error is None and answer == [ANSWER]  # six words, six tokens


def test_streamed_text_is_kept_for_the_next_turn_too(engine: str) -> None:
    cfg = config(engine, "m1", api="chat", vllm=False)
    answer: list[str] = []
    send(Endpoint(engine, 5.0), cfg, request_body(cfg, Prompt("hi", 6)), time.monotonic(), None, answer)
    assert "".join(answer) == ANSWER


def test_a_usage_total_is_spread_by_largest_remainders() -> None:
    assert spread(1, [1, 5]) == [0, 1]  # fewer tokens than events: the heaviest event gets it
    assert spread(4, [0, 0, 10]) == [1, 1, 2]  # as many as events: none left empty, taken from the largest
    assert spread(6, [0, 0, 0]) == [2, 2, 2] and spread(5, [1, 1]) == [3, 2]  # no weights: evenly, earlier first
    assert spread(0, [2, 3]) == [0, 0]


def test_a_tokenizer_counts_without_special_tokens_or_truncation(tmp_path: Path) -> None:
    folder = minilm_snapshot()  # WordPiece, truncation and padding at 128 in its config
    for path in (folder, folder / "tokenizer.json"):
        count = load_token_counter(str(path))
        assert count("paris") == 1 and count(" paris" * 600) == 600
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(UsageError, match="Cannot load a tokenizer from") as e:
        load_token_counter(str(tmp_path))
    assert e.value.hint == "Pass a tokenizer.json or its folder."


def test_a_connection_is_closed_on_reset_and_a_fresh_endpoint_resets_quietly(engine: str) -> None:
    endpoint = Endpoint(engine, 5.0)
    endpoint.reset()  # nothing open yet
    conn = endpoint.connection()
    conn.connect()
    endpoint.reset()
    assert conn.sock is None and endpoint.connection() is not conn and not endpoint.reused


def test_the_request_says_what_it_sends_and_accepts_and_reports_its_start() -> None:
    """Managed APIs refuse a body without its JSON content type; `on_start` gets the very record returned."""
    heads: list[bytes] = []
    started = []
    with scripted(delta("a"), b"data: [DONE]\n\n", pause_s=0.01, heads=heads) as url:
        cfg = config(url)
        body = request_body(cfg, Prompt("hi", 2))
        record = send(Endpoint(url, 5.0), cfg, body, time.monotonic(), on_start=started.append)
    lines = {line.split(b":", 1)[0].lower(): line.split(b":", 1)[1].strip() for line in heads[0].split(b"\r\n")[1:]}
    assert heads[0].startswith(b"POST /v1/chat/completions ")
    assert (lines[b"content-type"], lines[b"accept"]) == (b"application/json", b"text/event-stream")
    assert started == [record] and started[0] is record and record.error is None


def test_an_https_endpoint_opens_a_tls_connection() -> None:
    import http.client

    assert isinstance(Endpoint("https://api.example.com/v1", 5.0).connection(), http.client.HTTPSConnection)
    assert not isinstance(Endpoint("http://api.example.com/v1", 5.0).connection(), http.client.HTTPSConnection)


def test_newer_vllm_s_reasoning_field_and_a_completions_stream_with_an_empty_last_text() -> None:
    thinking = event({"choices": [{"delta": {"reasoning": "hm"}}]})  # vLLM 0.10+ names it `reasoning`
    with scripted(thinking, delta("Yes"), b"data: [DONE]\n\n", pause_s=0.01) as url:
        record, _, _ = ask(url)
    assert record.reasoning and len(record.events) == 2 and record.first_answer == record.events[1][0]
    texts = [event({"choices": [{"text": t, "finish_reason": None}]}) for t in ("Hel", "lo")]
    last = event({"choices": [{"text": "", "finish_reason": "length"}]})
    answer: list[str] = []
    with scripted(*texts, last, b"data: [DONE]\n\n", pause_s=0.01) as url:
        cfg = config(url, api="completions")
        record = send(Endpoint(url, 5.0), cfg, request_body(cfg, Prompt("hi", 2)), time.monotonic(), None, answer)
    assert (record.error, len(record.events), record.reasoning, "".join(answer)) == (None, 2, False, "Hello")
