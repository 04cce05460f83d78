"""Real traffic to replay: when each request arrived and how long its prompt and answer were, read from a
trace file. Three formats:

- JSONL, one request a line: {"arrival": seconds, "input_tokens": n, "output_tokens": m} (`timestamp` is
  taken for `arrival`);
- the Azure LLM inference trace (CSV: TIMESTAMP as a date and time, ContextTokens, GeneratedTokens);
- BurstGPT (CSV: Timestamp in seconds, Model, Request tokens, Response tokens, Total tokens, Log Type).

Arrivals are made relative to the first request; rows that asked for no tokens (BurstGPT logs failed
requests with 0 response tokens) cannot be replayed and are left out, counted.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deploykit.core.errors import UsageError


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the trace's first request
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Trace:
    arrivals: list[Arrival]
    skipped: int  # rows with no prompt or no answer tokens

    @property
    def span_s(self) -> float:
        return self.arrivals[-1].at if self.arrivals else 0.0


_HINT = (
    'A trace is JSONL ({"arrival": 0.5, "input_tokens": 512, "output_tokens": 128} a line), the Azure LLM '
    "inference trace CSV, or BurstGPT's CSV."
)


def read_trace(path: Path) -> Trace:
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"Cannot read the trace {path}: {e.strerror}.", _HINT) from e
    first = text.lstrip()[:1]
    rows = _jsonl(text, path) if first == "{" else _csv(text, path)
    kept = sorted((r for r in rows if r[1] >= 1 and r[2] >= 1), key=lambda r: r[0])
    if not kept:
        raise UsageError(f"The trace {path} holds no request with prompt and answer tokens.", _HINT)
    start = kept[0][0]
    return Trace([Arrival(at - start, i, o) for at, i, o in kept], skipped=len(rows) - len(kept))


def _jsonl(text: str, path: Path) -> list[tuple[float, int, int]]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            at = item["arrival"] if "arrival" in item else item["timestamp"]
            rows.append((float(at), int(item["input_tokens"]), int(item["output_tokens"])))
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"Line {number} of the trace {path} is not a request: {e!r}.", _HINT) from e
    return rows


def _csv(text: str, path: Path) -> list[tuple[float, int, int]]:
    reader = csv.DictReader(io.StringIO(text))
    fields = set(reader.fieldnames or ())
    parse_time: Callable[[str], float]
    if {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= fields:
        columns, parse_time = ("TIMESTAMP", "ContextTokens", "GeneratedTokens"), _azure_time
    elif {"Timestamp", "Request tokens", "Response tokens"} <= fields:
        columns, parse_time = ("Timestamp", "Request tokens", "Response tokens"), float
    else:
        raise UsageError(f"The trace {path} has columns {sorted(fields)}, none of the formats deploykit reads.", _HINT)
    rows = []
    for number, row in enumerate(reader, 2):  # line 1 is the header
        try:
            rows.append((parse_time(row[columns[0]]), int(row[columns[1]]), int(row[columns[2]])))
        except (ValueError, TypeError) as e:
            raise UsageError(f"Line {number} of the trace {path} is not a request: {e}.", _HINT) from e
    return rows


def _azure_time(text: str) -> float:
    """'2023-11-16 18:15:46.6805900' (seven digits of fraction, as the trace writes them) in seconds."""
    whole, _, fraction = text.strip().partition(".")
    moment = dt.datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.UTC)
    return moment.timestamp() + (float(f"0.{fraction}") if fraction else 0.0)
