"""The usage ledger: one row per request, committed before the response's last bytes leave the gateway.

A writer thread commits rows in groups (one transaction for whatever queued up meanwhile), so that a
busy gateway pays one commit per group, not per request, and the event loop never waits on the disk.
`record` returns once the row is committed: the proxy awaits it before it sends a stream's final
`[DONE]` event or a whole response, so anything a client received is in the ledger even if the gateway
is killed right after. Work that must commit with a row (a spend budget's settlement) rides along in the
same transaction.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol

from deploykit.serve.accounting.database import Database, Run

log = logging.getLogger("deploykit.gateway")


@dataclass(frozen=True)
class UsageRecord:
    at: float  # wall-clock time the request arrived (unix seconds)
    key_id: str | None
    model: str
    endpoint: str
    status: int
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    duration_ms: float
    replica: str | None
    error: str | None = None
    cost_usd: float | None = None  # at the managed API's price when spilled, else at serve --token-price (if set)
    audio_seconds: float | None = None  # the audio a transcription or translation took in


# The requests table's columns are UsageRecord's fields, by name, and the UTC day (for grouping).
_FIELDS = tuple(f.name for f in fields(UsageRecord))
_INSERT = f"INSERT INTO requests ({', '.join(_FIELDS)}, day) VALUES ({', '.join('?' * (len(_FIELDS) + 1))})"


def _values(record: UsageRecord) -> tuple[object, ...]:
    return (*(getattr(record, name) for name in _FIELDS), _day(record.at))


class Work(Protocol):
    """Writes that commit with a row, all or none (budgets.Settlement)."""

    def apply(self, run: Run) -> None: ...

    def committed(self) -> None:
        """Called once the transaction has committed."""


_Pending = tuple[UsageRecord, Work | None, asyncio.AbstractEventLoop | None, "asyncio.Future[None] | None"]


class Ledger:
    def __init__(self, db: Database, *, max_batch: int = 512) -> None:
        self.db = db
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._max_batch = max_batch
        self._writer = threading.Thread(target=self._write_loop, name="ledger-writer", daemon=True)
        self._writer.start()

    async def record(self, record: UsageRecord, work: Work | None = None) -> None:
        """Queue the row (and `work`, which commits with it) and return once it is committed."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._queue.put((record, work, loop, done))
        await done

    def record_nowait(self, record: UsageRecord, work: Work | None = None) -> None:
        """Queue the row without waiting (for requests whose client has gone)."""
        self._queue.put((record, work, None, None))

    def close(self) -> None:
        """Commit everything queued, then stop the writer."""
        self._queue.put(None)
        self._writer.join()

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            stop = item is None
            batch = [] if item is None else [item]
            while len(batch) < self._max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            if batch:
                self._commit(batch)
            if stop:
                return

    def _commit(self, batch: Sequence[_Pending]) -> None:
        error: Exception | None = None
        rows = [_values(record) for record, _, _, _ in batch]
        works = [work for _, work, _, _ in batch if work is not None]
        try:
            if works:
                self.db.exclusive(lambda run: _insert_with(run, rows, works))
            else:
                self.db.executemany(_INSERT, rows)
        except Exception as e:  # a full disk must not kill the writer; the requests still get their answer
            log.exception("could not write %d ledger rows", len(batch))
            error = e
        else:
            for work in works:
                work.committed()
        for _, _, loop, done in batch:
            if loop is not None and done is not None:
                loop.call_soon_threadsafe(_settle, done, error)


def _insert_with(run: Run, rows: Sequence[tuple[object, ...]], works: Sequence[Work]) -> None:
    for row in rows:
        run(_INSERT, row)
    for work in works:
        work.apply(run)


def _settle(done: asyncio.Future[None], error: Exception | None) -> None:
    if not done.done():  # else the awaiting request was cancelled
        done.set_result(None)  # a failed write is logged by the writer; the client still gets its answer


def _day(at: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(at))


@dataclass(frozen=True)
class UsageRow:
    group: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float = 0.0  # what the ledger priced (spilled requests; local ones under serve --token-price)
    audio_seconds: float = 0.0  # transcribed or translated


_GROUPS = {
    "model": "r.model",
    "key": "COALESCE(k.name, r.key_id, '(no key)')",
    "day": "r.day",
    "budget": "COALESCE(k.budget, '(no budget)')",
}


def usage_by(db: Database, by: str, since: float = 0.0) -> list[UsageRow]:
    """Requests, tokens and priced cost since `since` (unix seconds), grouped by model, key, UTC day or the
    keys' budget (as each key is attached now)."""
    group = _GROUPS[by]
    rows = db.query(
        f"SELECT {group}, COUNT(*), SUM(CASE WHEN r.status >= 400 THEN 1 ELSE 0 END), "
        "SUM(r.prompt_tokens), SUM(r.completion_tokens), SUM(COALESCE(r.cost_usd, 0)), "
        "SUM(COALESCE(r.audio_seconds, 0)) "
        "FROM requests r LEFT JOIN api_keys k ON k.id = r.key_id "
        f"WHERE r.at >= ? GROUP BY {group} ORDER BY {group}",
        (since,),
    )
    return [UsageRow(str(g), int(n), int(e), int(p), int(c), float(u), float(a)) for g, n, e, p, c, u, a in rows]


def deployment_hours(db: Database, since: float = 0.0, now: float | None = None) -> dict[str, float]:
    """Hours each device kind served since `since`, counted per GPU ('cpu' counts machines)."""
    now = time.time() if now is None else now
    hours: dict[str, float] = {}
    for device, gpus, started, last_seen in db.query(
        "SELECT device, gpus, started_at, last_seen_at FROM deployments WHERE last_seen_at >= ?", (since,)
    ):
        span = max(0.0, min(last_seen, now) - max(started, since)) / 3600
        hours[device] = hours.get(device, 0.0) + span * max(1, gpus)
    return hours


class DeploymentLog:
    """The deployments table: when a gateway served what on which hardware, for GPU-hour costs."""

    def __init__(self, db: Database, models: Sequence[str], device: str, gpus: int) -> None:
        self.db = db
        self.id = uuid.uuid4().hex
        now = time.time()
        db.execute(
            "INSERT INTO deployments (id, models, device, gpus, started_at, last_seen_at) VALUES (?, ?, ?, ?, ?, ?)",
            (self.id, ",".join(models), device, gpus, now, now),
        )

    def heartbeat(self) -> None:
        self.db.execute("UPDATE deployments SET last_seen_at = ? WHERE id = ?", (time.time(), self.id))

    def stop(self) -> None:
        now = time.time()
        self.db.execute("UPDATE deployments SET last_seen_at = ?, stopped_at = ? WHERE id = ?", (now, now, self.id))
