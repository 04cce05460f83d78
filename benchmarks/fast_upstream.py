"""An OpenAI-compatible streaming server with a fixed token schedule and almost no CPU cost per event.

    python -m benchmarks.fast_upstream --port 9100 [--ttft 0.1] [--gap 0.05]

Plain asyncio, no framework: so that the gateway, not the upstream, is what a benchmark measures. Every
answer (chat or completions) is max_tokens events of one token ("t") each: the first TTFT after the
request, then one every GAP; a usage chunk when stream_options asks, then [DONE]. Keep-alive, chunked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

_ROLE = (
    b'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
)
_CHAT = b'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"t"}}]}\n\n'
_TEXT = b'data: {"object":"text_completion","choices":[{"index":0,"text":"t"}]}\n\n'
_DONE = b"data: [DONE]\n\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _usage(prompt: int, completion: int) -> bytes:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return b"data: " + json.dumps({"choices": [], "usage": usage}, separators=(",", ":")).encode() + b"\n\n"


async def _answer(writer: asyncio.StreamWriter, path: str, body: dict[str, object], ttft: float, gap: float) -> None:
    started = time.monotonic()
    n = int(body.get("max_tokens") or 16)  # type: ignore[call-overload]
    prompt = len(json.dumps(body.get("messages") or body.get("prompt") or "")) // 4
    if not body.get("stream"):
        await asyncio.sleep(ttft + gap * (n - 1))
        usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
        text = json.dumps({"object": "text_completion", "choices": [{"index": 0, "text": "t" * n}], "usage": usage})
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (len(text), text.encode())
        )
        return
    chat = path.endswith("/chat/completions")
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    if chat:
        writer.write(_chunk(_ROLE))
    event = _chunk(_CHAT if chat else _TEXT)
    for i in range(n):
        # sleep until the schedule's time for token i, so that lag does not accumulate
        await asyncio.sleep(max(0.0, started + ttft + i * gap - time.monotonic()))
        writer.write(event)
        await writer.drain()
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        writer.write(_chunk(_usage(prompt, n)))
    writer.write(_chunk(_DONE) + b"0\r\n\r\n")
    await writer.drain()


async def _connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ttft: float, gap: float) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *lines = head.decode("latin-1").split("\r\n")
            method, path, _ = request_line.split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
            raw = await reader.readexactly(int(headers.get("content-length", "0")))
            if method == "GET":
                text = b'{"object":"list","data":[{"id":"fast","object":"model"}]}' if "models" in path else b"{}"
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(text), text)
                )
            else:
                await _answer(writer, path, json.loads(raw), ttft, gap)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(port: int, ttft: float, gap: float) -> None:
    server = await asyncio.start_server(lambda r, w: _connection(r, w, ttft, gap), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft", type=float, default=0.1)
    parser.add_argument("--gap", type=float, default=0.05)
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.port, args.ttft, args.gap))


if __name__ == "__main__":
    main()
