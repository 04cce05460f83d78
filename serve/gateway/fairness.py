"""A gateway-wide cap on requests in flight to the engines, shared by priority tier and fairly between keys.

Off unless `serve --max-concurrent-streams N` is given. Up to N requests run at once; more wait in a
queue. Each slot that frees goes to the best tier waiting (high, then normal, then batch), and within it
to the waiting key with the fewest requests in flight (the longest waiting among equals), so one key
flooding the gateway cannot keep another's requests from running: that key waits at most until one
request ends. Batch requests never take the last quarter of the slots (`batch_limit`), which stay free
for interactive tiers to start at once. A request that waits longer than `max_wait_s` gets a 503 with
Retry-After; when `max_waiting` requests are queued, a newcomer of a better tier takes the place of the
newest batch request, which gets a 429, and any other newcomer is refused (503, or 429 for batch).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass, field

from deploykit.serve.accounting.keys import PRIORITIES
from deploykit.serve.gateway.errors import GatewayError


@dataclass(eq=False)
class Slot:
    """One request's place among those in flight, until `release`."""

    key: str
    queue: FairQueue = field(repr=False)
    released: bool = False

    def release(self) -> None:
        self.queue.release(self)


TIERS = tuple(PRIORITIES)  # best first; a key's tier is its `priority`


@dataclass
class _Waiter:
    key: str
    order: int
    future: asyncio.Future[None] = field(repr=False)
    tier: int = 1  # its index in TIERS


class FairQueue:
    def __init__(self, limit: int, *, max_wait_s: float = 30.0, max_waiting: int | None = None) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.batch_limit = limit - limit // 4  # batch requests leave the last quarter of the slots free
        self.max_wait_s = max_wait_s
        self.max_waiting = max_waiting if max_waiting is not None else 8 * limit
        self.in_flight: dict[str, int] = {}
        self.total = 0
        self._waiting: dict[str, deque[_Waiter]] = {}
        self._queued = 0
        self._order = itertools.count()

    @property
    def queued(self) -> int:
        return self._queued

    async def acquire(self, key: str, tier: str = "normal") -> Slot:
        """A slot for one request of `key` (the key's id; "" without keys), once it is its tier's and key's turn."""
        rank = TIERS.index(tier)
        if not self._queued and self.total < self._cap(rank):  # nobody waits, a slot is free: no queueing
            return self._take(key)
        waiter = _Waiter(key, next(self._order), asyncio.get_running_loop().create_future(), rank)
        self._waiting.setdefault(key, deque()).append(waiter)
        self._queued += 1
        self._grant()
        if waiter.future.done():  # a slot was free for it
            return Slot(key, self)
        if self._queued > self.max_waiting and not self._shed(rank):
            self._forget(waiter)
            raise _busy(f"{self._queued} requests are already waiting", self.max_wait_s, rank)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.max_wait_s)
        except TimeoutError:
            self._give_up(waiter)
            raise _busy(f"no slot freed within {self.max_wait_s:g} s", self.max_wait_s, rank) from None
        except BaseException:  # the client left while it waited, or a better tier took its place
            self._give_up(waiter)
            raise
        return Slot(key, self)

    def release(self, slot: Slot) -> None:
        if slot.released:
            return
        slot.released = True
        self.total -= 1
        left = self.in_flight[slot.key] - 1
        if left:
            self.in_flight[slot.key] = left
        else:
            del self.in_flight[slot.key]
        self._grant()

    def _take(self, key: str) -> Slot:
        self.total += 1
        self.in_flight[key] = self.in_flight.get(key, 0) + 1
        return Slot(key, self)

    def _grant(self) -> None:
        while self.total < self.limit:
            heads = [q[0] for q in self._waiting.values() if self.total < self._cap(q[0].tier)]
            if not heads:
                return
            waiter = min(heads, key=lambda w: (w.tier, self.in_flight.get(w.key, 0), w.order))
            self._forget(waiter)
            if waiter.future.done():  # gave up meanwhile
                continue
            self._take(waiter.key)
            waiter.future.set_result(None)

    def _cap(self, tier: int) -> int:
        return self.batch_limit if TIERS[tier] == "batch" else self.limit

    def _shed(self, rank: int) -> bool:
        """Make room in a full queue for a newcomer of tier `rank` by refusing the newest waiter of a worse tier."""
        worse = [q[-1] for q in self._waiting.values() if q[-1].tier > rank]
        if not worse:
            return False
        victim = max(worse, key=lambda w: (w.tier, w.order))
        self._forget(victim)
        victim.future.set_exception(_busy("higher-priority requests took its place", self.max_wait_s, victim.tier))
        return True

    def _forget(self, waiter: _Waiter) -> None:
        queue = self._waiting.get(waiter.key)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self._queued -= 1
            if not queue:
                del self._waiting[waiter.key]

    def _give_up(self, waiter: _Waiter) -> None:
        future = waiter.future
        if future.done() and not future.cancelled() and future.exception() is None:
            self.release(Slot(waiter.key, self))  # granted in the same instant it gave up: hand the slot on
        else:
            waiter.future.cancel()
            self._forget(waiter)


def _busy(why: str, retry_after_s: float, tier: int) -> GatewayError:
    """503 for interactive tiers; batch traffic, which is meant to wait, gets 429 and is told to come back."""
    batch = TIERS[tier] == "batch"
    return GatewayError(
        429 if batch else 503,
        f"The gateway is at its limit of concurrent requests ({why}); "
        + ("batch requests yield to interactive ones, retry later." if batch else "retry shortly."),
        "priority" if batch else "service_unavailable",
        "overloaded",
        headers={"Retry-After": str(max(1, round(retry_after_s / (1 if batch else 4))))},
    )
