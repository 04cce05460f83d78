"""Send one OpenAI-compatible request and time everything about it: headers, every SSE event and the
tokens it carries, the end, the status and the class of any error."""

from __future__ import annotations

import http.client
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from deploykit.core.errors import UsageError
from deploykit.loadtests.config import LoadTestConfig
from deploykit.loadtests.records import RequestRecord
from deploykit.loadtests.workload import Prompt


def request_body(cfg: LoadTestConfig, prompt: Prompt, history: Sequence[dict[str, str]] = ()) -> dict[str, Any]:
    """The request for `prompt`; in a conversation, after the turns so far (`history`)."""
    body: dict[str, Any] = {"model": cfg.model, "max_tokens": prompt.max_tokens, "stream": cfg.stream}
    if cfg.api == "chat":
        body["messages"] = [*history, {"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = prompt.text
    if cfg.stream:
        body["stream_options"] = {"include_usage": True}
        if cfg.vllm:
            body["stream_options"]["continuous_usage_stats"] = True
    if cfg.vllm:
        body["ignore_eos"] = True
    if cfg.temperature is not None:
        body["temperature"] = cfg.temperature
    return body


class Endpoint:
    """One keep-alive HTTP connection to the target (stdlib http.client: the fewest layers between the
    clock and the socket), reopened after any error."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.https else 80)
        self.base = parts.path.rstrip("/")
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None
        self.reused = False

    def connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            self._conn = kind(self.host, self.port, timeout=self.timeout)
            self.reused = False
        else:
            self.reused = True
        return self._conn

    def reset(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None


TokenCounter = Callable[[str], int]


def load_token_counter(path: str) -> TokenCounter:
    """Count tokens with a model's own tokenizer (tokenizer.json), for servers that report no usage."""
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises its own untyped exceptions
        raise UsageError(f"Cannot load a tokenizer from {path}: {e}.", "Pass a tokenizer.json or its folder.") from e
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def send(
    endpoint: Endpoint,
    cfg: LoadTestConfig,
    body: dict[str, Any],
    scheduled: float,
    count_tokens: TokenCounter | None = None,
    answer_text: list[str] | None = None,
    on_start: Callable[[RequestRecord], None] | None = None,
) -> RequestRecord:
    """Send one request and time it; with `answer_text`, the answer's text is collected there (for the next
    turn of a conversation). `on_start` gets the record as the request leaves, while it fills in: a run that
    cuts the request off still knows the tokens it had received."""
    payload = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream", **cfg.headers()}
    path = endpoint.base + cfg.path()
    for attempt in (1, 2):
        sent = time.monotonic()  # after encoding: the clock starts as the request leaves
        record = RequestRecord(scheduled=scheduled, sent=sent, end=sent)
        if on_start is not None:
            on_start(record)
        try:
            conn = endpoint.connection()
            conn.request("POST", path, payload, headers)
            response = conn.getresponse()
            record.headers_at = time.monotonic()
            record.status = response.status
            if response.status != 200:
                record.error = _status_class(response.status)
                if response.status == 429 and (after := response.getheader("Retry-After")):
                    record.retry_after = float(after)
                response.read()
            elif cfg.stream:
                _read_stream(response, cfg, record, count_tokens, answer_text)
            else:
                data = json.loads(response.read())
                _read_whole(data, record, time.monotonic())
                if answer_text is not None:
                    answer_text.append(_whole_text(data, cfg))
        except TimeoutError:
            record.error = "timeout"
        except (http.client.HTTPException, OSError):
            if record.headers_at is None and endpoint.reused and attempt == 1:
                endpoint.reset()  # the server closed an idle keep-alive connection: a new one, once
                continue
            record.error = "cut" if record.headers_at is not None else "connect"
        record.end = time.monotonic()
        if record.error is not None:
            endpoint.reset()
        return record
    raise AssertionError("unreachable")


def _read_stream(
    response: http.client.HTTPResponse,
    cfg: LoadTestConfig,
    record: RequestRecord,
    count_tokens: TokenCounter | None,
    answer_text: list[str] | None = None,
) -> None:
    buffer = b""
    done = False
    counted = 0  # tokens per event when the server reports no running usage
    weights: list[int] = []  # each content event's text length (or tokenizer count), to spread a usage total by
    running = False  # the server sent running usage: each event's tokens are exact
    while data := response.read1(65536):  # whatever has arrived, as soon as it has
        now = time.monotonic()
        buffer += data
        while b"\n\n" in buffer:
            raw, buffer = buffer.split(b"\n\n", 1)
            payload = b"".join(line[5:].strip() for line in raw.split(b"\n") if line.startswith(b"data:"))
            if not payload:
                continue
            if payload == b"[DONE]":
                done = True
                continue
            event = json.loads(payload)
            if record.response_id is None and isinstance(event.get("id"), str):
                record.response_id = event["id"]
            if "error" in event:
                record.error = "cut"
                continue
            usage = event.get("usage")
            reasoning, answer = _content(event, cfg)
            if reasoning or answer:
                text = reasoning + answer
                if usage and usage.get("completion_tokens") is not None:
                    tokens, running = usage["completion_tokens"] - counted, True  # running usage: exact
                    weight = 0  # nothing to spread: every event's count is the server's
                else:
                    weight = max(1, count_tokens(text)) if count_tokens else len(text)
                    tokens = weight if count_tokens else 1
                record.events.append((now, tokens))
                weights.append(weight)
                counted += tokens
                if answer and record.first_answer is None:
                    record.first_answer = now
                if answer_text is not None:
                    answer_text.append(answer)
                record.reasoning = record.reasoning or bool(reasoning)
            if usage:
                record.output_tokens = usage.get("completion_tokens") or 0
                record.input_tokens = usage.get("prompt_tokens") or 0
                record.usage_reported = True
    if not record.usage_reported:
        record.output_tokens = counted  # flagged: counted from the stream, not reported by the server
        record.counted_by = "tokenizer" if count_tokens else "events"
    elif not running and counted != record.output_tokens and record.events:
        # the server's total is the truth; its events carried several tokens each: spread it over them
        tokens = spread(record.output_tokens, weights)
        record.events = [(t, k) for (t, _), k in zip(record.events, tokens, strict=True)]
        record.counted_by = "server total, spread by tokenizer" if count_tokens else "server total, spread by text"
    if not done and record.error is None:
        record.error = "cut"


def spread(total: int, weights: Sequence[int]) -> list[int]:
    """`total` tokens over events in proportion to `weights` (largest remainders first, earlier events on
    ties); then, while there are as many tokens as events, an event left with none takes one from the
    event with the most."""
    n = len(weights)
    shares_of = list(weights) if any(weights) else [1] * n
    whole = sum(shares_of)
    shares = [total * w / whole for w in shares_of]
    tokens = [math.floor(share) for share in shares]
    largest_remainders = sorted(range(n), key=lambda i: (tokens[i] - shares[i], i))
    for i in largest_remainders[: total - sum(tokens)]:
        tokens[i] += 1
    for i in range(n if total >= n else 0):
        if tokens[i] == 0:
            tokens[max(range(n), key=lambda j: tokens[j])] -= 1
            tokens[i] = 1
    return tokens


def _read_whole(data: dict[str, Any], record: RequestRecord, now: float) -> None:
    record.response_id = data["id"] if isinstance(data.get("id"), str) else None
    usage = data.get("usage") or {}
    record.output_tokens = usage.get("completion_tokens") or 0
    record.input_tokens = usage.get("prompt_tokens") or 0
    record.usage_reported = bool(usage)
    record.events.append((now, record.output_tokens))


def _content(event: dict[str, Any], cfg: LoadTestConfig) -> tuple[str, str]:
    """An event's (reasoning, answer) text: a reasoning model's thinking (`reasoning_content`, or `reasoning`
    in newer vLLM) is output too, and its first token is the first token."""
    choices = event.get("choices") or []
    if not choices:
        return "", ""
    choice = choices[0]
    if cfg.api == "chat":
        delta = choice.get("delta") or {}
        return str(delta.get("reasoning_content") or delta.get("reasoning") or ""), str(delta.get("content") or "")
    return "", str(choice.get("text") or "")


def _whole_text(data: dict[str, Any], cfg: LoadTestConfig) -> str:
    choices = data.get("choices") or [{}]
    if cfg.api == "chat":
        return str((choices[0].get("message") or {}).get("content") or "")
    return str(choices[0].get("text") or "")


def _status_class(status: int) -> str:
    if status == 429:
        return "429"
    return "5xx" if status >= 500 else "4xx"


def engine_version(url: str, api_key: str | None = None) -> str | None:
    """The serving engine's version from GET /version (vLLM and the deploykit gateway answer it), if any."""
    root = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = requests.get(root + "/version", headers=headers, timeout=3)
        version = response.json().get("version") if response.status_code == 200 else None
    except (requests.RequestException, ValueError, AttributeError):
        return None
    return str(version) if version else None


def discover_model(url: str, api_key: str | None) -> str:
    """The endpoint's first model, from GET /v1/models."""
    base = url.rstrip("/") + ("" if url.rstrip("/").endswith("/v1") else "/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = requests.get(base + "/models", headers=headers, timeout=10)
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])
    except (requests.RequestException, KeyError, IndexError, ValueError) as e:
        raise UsageError(f"Could not list the models of {url} ({e}).", "Pass --model.") from e
