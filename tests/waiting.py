"""Waiting on processes the tests start: a condition by a deadline, a gateway's /ready."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx


def until(check: Callable[[], bool], what: str, timeout_s: float = 30, every_s: float = 0.1) -> None:
    """Poll `check` until it holds; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(every_s)


def ready(url: str) -> bool:
    """The gateway (or engine) at `url` answers /ready with 200."""
    try:
        return httpx.get(url + "/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
