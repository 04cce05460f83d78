"""Send one OpenAI-compatible request and time everything about it: headers, every SSE event and the
tokens it carries, the end, the status and the class of any error."""

from __future__ import annotations

import json
import time
from typing import Any

import requests

from deploykit.errors import UsageError
from deploykit.loadtests.config import LoadTestConfig
from deploykit.loadtests.records import RequestRecord

# A word that most tokenizers count as one token, so that a prompt of N words is about N tokens.
_WORD = " hello"


def request_body(cfg: LoadTestConfig, prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    prompt = "Count:" + _WORD * max(prompt_tokens - 1, 0)
    body: dict[str, Any] = {"model": cfg.model, "max_tokens": output_tokens, "stream": cfg.stream}
    if cfg.api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if cfg.stream:
        body["stream_options"] = {"include_usage": True}
        if cfg.vllm:
            body["stream_options"]["continuous_usage_stats"] = True
    if cfg.vllm:
        body["ignore_eos"] = True
    return body


def send(
    session: requests.Session, cfg: LoadTestConfig, url: str, body: dict[str, Any], scheduled: float
) -> RequestRecord:
    prepared = session.prepare_request(requests.Request("POST", url, json=body, headers=cfg.headers()))
    sent = time.monotonic()  # after encoding: the clock starts as the request leaves
    record = RequestRecord(scheduled=scheduled, sent=sent, end=sent)
    try:
        with session.send(prepared, stream=True, timeout=cfg.timeout_s) as response:
            record.headers_at = time.monotonic()
            record.status = response.status_code
            if response.status_code != 200:
                record.error = _status_class(response.status_code)
                if response.status_code == 429 and (after := response.headers.get("Retry-After")):
                    record.retry_after = float(after)
                response.content  # noqa: B018  (drain, so the connection can be reused)
            elif cfg.stream:
                _read_stream(response, cfg, record)
            else:
                _read_whole(response.json(), cfg, record, time.monotonic())
    except requests.exceptions.ConnectionError as e:
        # a connection refused before any byte is `connect`; one lost mid-stream is a cut stream
        record.error = "cut" if record.headers_at is not None else "connect"
        if isinstance(e.__context__, TimeoutError):
            record.error = "timeout"
    except requests.exceptions.Timeout:
        record.error = "timeout"
    except requests.exceptions.ChunkedEncodingError:
        record.error = "cut"
    record.end = time.monotonic()
    return record


def _read_stream(response: requests.Response, cfg: LoadTestConfig, record: RequestRecord) -> None:
    buffer = b""
    done = False
    counted = 0  # tokens per event when the server reports no running usage
    for data in response.iter_content(chunk_size=None):
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
            if "error" in event:
                record.error = "cut"
                continue
            usage = event.get("usage")
            text = _content(event, cfg)
            if text:
                if usage and usage.get("completion_tokens") is not None:
                    tokens = usage["completion_tokens"] - counted  # running usage: exact tokens per event
                else:
                    tokens = 1
                record.events.append((now, tokens))
                counted += tokens
            if usage:
                record.output_tokens = usage.get("completion_tokens") or 0
                record.input_tokens = usage.get("prompt_tokens") or 0
                record.usage_reported = True
    if not record.usage_reported:
        record.output_tokens = counted  # flagged: counted from the stream, one token per event
    if not done and record.error is None:
        record.error = "cut"


def _read_whole(data: dict[str, Any], cfg: LoadTestConfig, record: RequestRecord, now: float) -> None:
    usage = data.get("usage") or {}
    record.output_tokens = usage.get("completion_tokens") or 0
    record.input_tokens = usage.get("prompt_tokens") or 0
    record.usage_reported = bool(usage)
    record.events.append((now, record.output_tokens))


def _content(event: dict[str, Any], cfg: LoadTestConfig) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if cfg.api == "chat":
        return str((choice.get("delta") or {}).get("content") or "")
    return str(choice.get("text") or "")


def _status_class(status: int) -> str:
    if status == 429:
        return "429"
    return "5xx" if status >= 500 else "4xx"


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
