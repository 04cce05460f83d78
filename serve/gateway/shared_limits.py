"""Quotas shared by every gateway of a deployment: the same token buckets and concurrency limit as
ratelimit.RateLimiter, kept in the database the gateways share (PostgreSQL) instead of in one process.

Admission runs in one database transaction that first updates the key's row, which locks it: admissions of
one key are serialised across every gateway process, so two gateways can never both take a key's last unit
(no over-admission, as in one process). The buckets refill on the wall clock (the hosts' clocks must agree,
as NTP keeps them). A request in flight holds a lease row until it ends; a gateway that dies mid-request
leaves leases that expire `lease_s` later, so its slots come back on their own. Settling tokens at the end
runs on a writer thread of its own, off the request's path.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable

from deploykit.serve.accounting.database import Database, Run
from deploykit.serve.accounting.keys import ApiKey
from deploykit.serve.gateway.ratelimit import Admission, KeyState, bucket, settle, take

log = logging.getLogger("deploykit.gateway")


class SharedRateLimiter:
    def __init__(self, db: Database, lease_s: float = 900.0, clock: Callable[[], float] = time.time) -> None:
        self.db, self.lease_s, self._clock = db, lease_s, clock
        self._settling: queue.Queue[tuple[Admission, int | None, float | None] | None] = queue.Queue()
        self._writer = threading.Thread(target=self._settle_loop, name="deploykit-quotas", daemon=True)
        self._writer.start()

    def admit(self, key: ApiKey, tokens: int, audio_s: float = 0.0) -> Admission:
        """As RateLimiter.admit, against the state every gateway shares (blocking: run it off the event loop)."""

        def work(run: Run) -> Admission:
            now = self._clock()
            state = self._load(run, key, now)
            admission = take(state, key, tokens, audio_s)  # raises the 429, and nothing is written
            admission.lease = uuid.uuid4().hex
            self._store(run, key.id, state, now)
            run(
                "INSERT INTO quota_leases (id, key_id, expires_at) VALUES (?, ?, ?)",
                (admission.lease, key.id, now + self.lease_s),
            )
            return admission

        return self.db.exclusive(work)

    def finish(self, admission: Admission, used_tokens: int | None, used_audio_s: float | None = None) -> None:
        """Release the slot and settle the tokens and audio, on the writer thread."""
        if admission.finished:
            return
        admission.finished = True
        self._settling.put((admission, used_tokens, used_audio_s))

    def flush(self) -> None:
        """Wait until every request ended so far is settled."""
        self._settling.join()

    def close(self) -> None:
        """Settle everything queued, then stop the writer."""
        self._settling.put(None)
        self._writer.join()

    def _settle_loop(self) -> None:
        while (item := self._settling.get()) is not None:
            try:
                self._settle(*item)
            except Exception:  # the database is away: this slot comes back when its lease expires
                log.exception("could not settle a request's quota")
            finally:
                self._settling.task_done()
        self._settling.task_done()

    def _settle(self, admission: Admission, used: int | None, used_audio: float | None) -> None:
        """Free the lease, and give back (or take) the tokens and audio reserved but not used."""

        def work(run: Run) -> None:
            run("DELETE FROM quota_leases WHERE id = ?", (admission.lease,))
            found = run("SELECT tpm, audio_spm FROM api_keys WHERE id = ?", (admission.key_id,))
            tpm, aspm = found[0] if found else (None, None)
            if not ((used is not None and tpm) or (used_audio is not None and aspm)):
                return
            run("UPDATE quota_state SET updated = updated WHERE key_id = ?", (admission.key_id,))  # the row lock
            [(tokens, audio, updated)] = run(
                "SELECT tokens, audio, updated FROM quota_state WHERE key_id = ?", (admission.key_id,)
            )
            state = KeyState(None, bucket(tpm, tokens, updated), audio=bucket(aspm, audio, updated))
            now = self._clock()
            settle(state, admission, used, now, used_audio)
            levels = [b.level if b else None for b in (state.tokens, state.audio)]
            run(
                "UPDATE quota_state SET tokens = ?, audio = ?, updated = ? WHERE key_id = ?",
                (*levels, now, admission.key_id),
            )

        self.db.exclusive(work)

    def _load(self, run: Run, key: ApiKey, now: float) -> KeyState:
        """The key's shared state, locked for this transaction and refilled to now (a bucket with no level
        yet, such as the key's first, is full)."""
        run(
            "INSERT INTO quota_state (key_id, requests, tokens, updated) VALUES (?, NULL, NULL, ?) "
            "ON CONFLICT (key_id) DO NOTHING",
            (key.id, now),
        )
        run("UPDATE quota_state SET updated = updated WHERE key_id = ?", (key.id,))  # the row lock
        [(requests, tokens, audio, updated)] = run(
            "SELECT requests, tokens, audio, updated FROM quota_state WHERE key_id = ?", (key.id,)
        )
        [(in_flight,)] = run("SELECT count(*) FROM quota_leases WHERE key_id = ? AND expires_at > ?", (key.id, now))
        return KeyState(
            bucket(key.rpm, requests, updated),
            bucket(key.tpm, tokens, updated),
            int(in_flight),
            bucket(key.audio_spm, audio, updated),
        ).refill(now)

    def _store(self, run: Run, key_id: str, state: KeyState, now: float) -> None:
        run(
            "UPDATE quota_state SET requests = ?, tokens = ?, audio = ?, updated = ? WHERE key_id = ?",
            (*(b.level if b else None for b in (state.requests, state.tokens, state.audio)), now, key_id),
        )
