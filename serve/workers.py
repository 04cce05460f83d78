"""`deploykit serve --workers N`: N gateway processes answering on one port, so that the gateway uses N
cores of a machine.

The first process (the one `serve` runs) binds the public port, starts and watches the engines, and starts
the N - 1 others. Each of those listens on the same port with a socket of its own (SO_REUSEPORT: the kernel
spreads new connections over the processes by their address; one socket shared by all handed a burst of
20 connections all to whichever process woke first, when this was measured), gets the
engines' addresses and the options on its standard input (secrets never appear on a command line), watches
the engines' health as a gateway in front of remote engines does, and exits when its standard input
closes: the first process is gone.

What must hold across the processes does: keys' quotas are kept in the database they share (on SQLite too,
whose write lock spans processes), every process writes its own ledger rows to it, and `--max-concurrent-
streams` is split between them. /metrics, whichever process answers it, adds up every process's own
figures, read from each one's private address on loopback (a port and a random path only the workers know).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

from deploykit.core.ports import free_port
from deploykit.serve.gateway.metrics import GatewayMetrics
from deploykit.serve.gateway.routing import Backend


@dataclass(frozen=True)
class Peers:
    """Where each gateway process of one deployment shows its own figures to the others."""

    secret: str  # the private path: a process on this machine that does not know it gets 404
    ports: tuple[int, ...]  # on 127.0.0.1, by process: 0 is the first

    @classmethod
    def pick(cls, count: int) -> Peers:
        return cls(secrets.token_urlsafe(24), tuple(free_port() for _ in range(count)))

    def others(self, index: int) -> tuple[str, ...]:
        """The private addresses of every process but `index`."""
        return tuple(f"http://127.0.0.1:{port}/{self.secret}" for i, port in enumerate(self.ports) if i != index)


async def serve_own_figures(metrics: GatewayMetrics, peers: Peers, index: int) -> web.AppRunner:
    """Answer the other processes' reads of this one's own figures, on its private address."""

    async def own(_: web.Request) -> web.Response:
        return web.Response(body=metrics.own(), content_type="text/plain")

    app = web.Application()
    app.router.add_get(f"/{peers.secret}", own)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", peers.ports[index]).start()
    return runner


class Workers:
    """The N - 1 other gateway processes, started by the first and restarted if one dies."""

    def __init__(self, spec: dict[str, Any], count: int) -> None:
        self.spec, self.count = spec, count
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.stopping = False

    def start(self) -> None:
        for index in range(1, self.count + 1):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        process = subprocess.Popen(
            [sys.executable, "-c", "from deploykit.serve.workers import main; main()"],
            stdin=subprocess.PIPE,
            start_new_session=True,  # a terminal's Ctrl-C reaches the first process alone, which stops them
        )
        assert process.stdin is not None
        process.stdin.write(json.dumps({**self.spec, "index": index}).encode() + b"\n")
        process.stdin.flush()  # and left open: its end tells the worker that the first process is gone
        self.processes[index] = process

    def step(self, warn: Callable[[str], None]) -> None:
        """Start again any worker that died (not one that was told to stop)."""
        for index, process in list(self.processes.items()):
            if not self.stopping and process.poll() is not None:
                warn(f"Gateway worker {index} exited (status {process.returncode}); starting it again.")
                self._spawn(index)

    def stop(self) -> None:
        """Ask every worker to drain and stop (SIGTERM, as the first process was asked)."""
        self.stopping = True
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> None:
        """Wait for the workers to end; kill what outlives `timeout_s`."""
        for process in self.processes.values():
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdin is not None:
                process.stdin.close()


def spec(options: Any, backends: Sequence[Backend], peers: Peers) -> dict[str, Any]:
    """What a worker needs to serve as the first process does: its options, the engines, the peers."""
    engines = [{"model": b.model, "url": b.url, "adapters": list(b.adapters), "context": b.context} for b in backends]
    return {"options": asdict(options), "engines": engines, "peers": asdict(peers)}


def _exit_when_stdin_closes() -> None:
    """The first process is gone (however it ended): stop as a SIGTERM stops a gateway, draining."""
    sys.stdin.buffer.read()
    os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    """A worker process: its spec from standard input, then the gateway until it is told to stop."""
    from deploykit.core.settings import Settings
    from deploykit.serve.runner import serve_worker

    given = json.loads(sys.stdin.buffer.readline())
    threading.Thread(target=_exit_when_stdin_closes, daemon=True).start()
    serve_worker(Settings(), given)
