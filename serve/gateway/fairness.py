"""A gateway-wide cap on requests in flight to the engines, shared fairly between API keys.

Off unless `serve --max-concurrent-streams N` is given. Up to N requests run at once; more wait in a
queue, and each slot that frees goes to the waiting key with the fewest requests in flight (the longest
waiting among equals), so one key flooding the gateway cannot keep another's requests from running:
that key waits at most until one request ends. A request that waits longer than `max_wait_s`, or finds
`max_waiting` requests already queued, gets a 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass, field

from deploykit.serve.gateway.errors import GatewayError


@dataclass(eq=False)
class Slot:
    """One request's place among those in flight, until `release`."""

    key: str
    queue: FairQueue = field(repr=False)
    released: bool = False

    def release(self) -> None:
        self.queue.release(self)


@dataclass
class _Waiter:
    key: str
    order: int
    future: asyncio.Future[None] = field(repr=False)


class FairQueue:
    def __init__(self, limit: int, *, max_wait_s: float = 30.0, max_waiting: int | None = None) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
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

    async def acquire(self, key: str) -> Slot:
        """A slot for one request of `key` (the key's id; "" without keys), once it is this key's turn."""
        if self.total < self.limit and not self._queued:
            return self._take(key)
        if self._queued >= self.max_waiting:
            raise _busy(f"{self._queued} requests are already waiting", self.max_wait_s)
        waiter = _Waiter(key, next(self._order), asyncio.get_running_loop().create_future())
        self._waiting.setdefault(key, deque()).append(waiter)
        self._queued += 1
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.max_wait_s)
        except TimeoutError:
            self._give_up(waiter)
            raise _busy(f"no slot freed within {self.max_wait_s:g} s", self.max_wait_s) from None
        except BaseException:  # the client left while it waited
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
        while self.total < self.limit and self._waiting:
            key = min(self._waiting, key=lambda k: (self.in_flight.get(k, 0), self._waiting[k][0].order))
            queue = self._waiting[key]
            waiter = queue.popleft()
            if not queue:
                del self._waiting[key]
            self._queued -= 1
            if waiter.future.done():  # gave up meanwhile
                continue
            self._take(key)
            waiter.future.set_result(None)

    def _forget(self, waiter: _Waiter) -> None:
        queue = self._waiting.get(waiter.key)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self._queued -= 1
            if not queue:
                del self._waiting[waiter.key]

    def _give_up(self, waiter: _Waiter) -> None:
        if waiter.future.done() and not waiter.future.cancelled():
            self.release(Slot(waiter.key, self))  # granted in the same instant it gave up: hand the slot on
        else:
            waiter.future.cancel()
            self._forget(waiter)


def _busy(why: str, retry_after_s: float) -> GatewayError:
    return GatewayError(
        503,
        f"The gateway is at its limit of concurrent requests ({why}); retry shortly.",
        "service_unavailable",
        "overloaded",
        headers={"Retry-After": str(max(1, round(retry_after_s / 4)))},
    )
