"""A synthetic OpenAI-compatible SSE server with a known schedule, to check what the load tester measures.

Every streamed answer: a role-only first chunk after ROLE_S, the first content event TTFT_S after the
request arrived, then one event every GAP_S carrying CHUNK_TOKENS[i % len] tokens (so some events carry
several), each with running usage when asked (vLLM's continuous_usage_stats), then a usage-only chunk and
[DONE]. The model "errors" injects faults by request number: n % 10 == 3 -> 429 with Retry-After: 2,
n % 10 == 5 -> 500, n % 10 == 7 -> the connection drops after 3 events. The model "queue" serves at most QUEUE_SLOTS
answers at a time; the others wait for a slot, so TTFT grows past that concurrency. The model "nousage"
reports no usage at all; each event's text is k words " x", k tokens for a word-level tokenizer. The model
"lastusage" sends its usage only at the end; "reasoning" too, its first half of events as reasoning_content.
The model "conversation" reports as prompt tokens the words of all the messages it was sent.
"""

from __future__ import annotations

import itertools
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROLE_S = 0.005
TTFT_S = 0.050
GAP_S = 0.020
CHUNK_TOKENS = (1, 1, 3, 1, 2)
QUEUE_SLOTS = 4


def chunk_plan(max_tokens: int) -> list[int]:
    """Tokens per content event for an answer of `max_tokens` tokens."""
    plan, left = [], max_tokens
    for k in itertools.cycle(CHUNK_TOKENS):
        if left <= 0:
            return plan
        plan.append(min(k, left))
        left -= plan[-1]
    raise AssertionError("unreachable")


def serve_sse(
    ttft_s: float = TTFT_S, gap_s: float = GAP_S, port: int = 0, log: str | None = None
) -> ThreadingHTTPServer:
    """Serve on `port` (0: a free one). `log`: a JSONL file where each streamed answer, when it ends, writes its
    id, when it arrived and when each content event left (time.monotonic(), the clock every process on the
    machine shares): the truth a load generator's timestamps are checked against (benchmarks/timing.py)."""
    counter = itertools.count()
    lock = threading.Lock()
    log_file = open(log, "a", buffering=1) if log else None  # noqa: SIM115 - open for the server's life
    slots = threading.Semaphore(QUEUE_SLOTS)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def parse_request(self) -> bool:
            self.arrived = time.monotonic()  # the schedule starts as the request line arrives
            return super().parse_request()

        def do_GET(self) -> None:
            self._send_json(200, {"object": "list", "data": [{"id": "synth", "object": "model"}]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if body["model"] == "queue":
                with slots:
                    self._answer(body)
            else:
                self._answer(body)

        def _answer(self, body: dict[str, object]) -> None:
            arrived = self.arrived if body["model"] != "queue" else time.monotonic()
            with lock:
                n = next(counter)
            if body["model"] == "errors" and n % 10 == 3:
                self._send_json(429, {"error": {"message": "slow down"}}, {"Retry-After": "2"})
                return
            if body["model"] == "errors" and n % 10 == 5:
                self._send_json(500, {"error": {"message": "boom"}})
                return
            cut = body["model"] == "errors" and n % 10 == 7
            options = body.get("stream_options") or {}
            if body["model"] == "nousage":
                options = {}
            prompt = 7
            if body["model"] == "conversation":  # the prompt's tokens: every message's words
                prompt = sum(len(str(m["content"]).split()) for m in body["messages"])  # type: ignore[union-attr]
            if body["model"] in ("lastusage", "reasoning"):
                options = {"include_usage": True}  # usage in the last chunk only, as OpenAI and Azure send it
            running = options.get("continuous_usage_stats", False)
            self.response_id, sends = f"cmpl-{n}", []
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._wait_until(arrived + ROLE_S)
            self._event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            done = 0
            plan = chunk_plan(body["max_tokens"])
            for i, k in enumerate(plan):
                self._wait_until(arrived + ttft_s + i * gap_s)
                done += k
                text = " x" * k if body["model"] == "nousage" else "x" * k
                # the reasoning model thinks for the first half of its tokens, then answers
                part = "reasoning_content" if body["model"] == "reasoning" and i < len(plan) // 2 else "content"
                event: dict[str, object] = {"choices": [{"index": 0, "delta": {part: text}}]}
                if running:
                    event["usage"] = {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}
                self._event(event)
                sends.append(time.monotonic())
                if cut and i == 2:  # the connection drops mid-body, as when a server dies
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
            if options.get("include_usage"):
                self._event({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": done}})
            self._chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            if log_file is not None:
                with lock:
                    log_file.write(json.dumps({"id": self.response_id, "arrived": arrived, "sends": sends}) + "\n")

        def _wait_until(self, t: float) -> None:
            delay = t - time.monotonic()
            if delay > 0:
                time.sleep(delay)

        def _event(self, data: dict[str, object]) -> None:
            self._chunk(f"data: {json.dumps({'id': self.response_id, **data})}\n\n".encode())

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

        def _send_json(self, status: int, data: object, headers: dict[str, str] | None = None) -> None:
            raw = json.dumps(data).encode()
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    server = _Server(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # hundreds of streams connect at once (the standard library's 5 resets them)


def main() -> None:
    """`python -m tests.fakes.sse_server [LOG]`: serve on a free port, print it, run until killed; LOG: the
    send-time log (serve_sse)."""
    server = serve_sse(log=sys.argv[1] if len(sys.argv) > 1 else None)
    print(server.server_address[1], flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
