"""The engine as a child process: started from a launch plan, watched, and stopped with its whole group.

Its output goes to a log file; the last lines stay in memory so that a failure can show them, and a few
patterns in them name the start-up phase for the progress display.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from deploykit.serve.plan import LaunchPlan

# Start-up phases, recognised from vLLM's log lines, in the order they happen.
_PHASES = (
    (re.compile(r"non-default args|Resolved architecture"), "reading the model config"),
    (re.compile(r"Starting to load model|Loading weights|Loading safetensors"), "loading weights"),
    (re.compile(r"Warming up model|torch\.compile|Compiling|compiled"), "compiling and warming up"),
    (re.compile(r"KV cache size|Capturing CUDA graph"), "allocating the KV cache"),
    (re.compile(r"init engine|Starting vLLM API server|Application startup complete"), "opening the API"),
)
_KV_TOKENS = re.compile(r"KV cache size: ([\d,]+) tokens")
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class EngineProgress:
    phase: str
    elapsed_s: float
    last_line: str


class EngineProcess:
    """One engine process started from a plan; `stop()` ends it and everything it spawned."""

    def __init__(self, plan: LaunchPlan, log_path: Path, *, tail: int = 40) -> None:
        self.plan = plan
        self.log_path = log_path
        self._lines: collections.deque[str] = collections.deque(maxlen=tail)
        self._phase = "starting the process"
        self._kv_tokens: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._started = 0.0

    @property
    def url(self) -> str:
        return self.plan.url

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def logged_kv_cache_tokens(self) -> int | None:
        """The KV cache capacity the engine reported at start-up, once it has."""
        return self._kv_tokens

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._started = time.monotonic()
        self._proc = subprocess.Popen(
            self.plan.argv,
            env={**os.environ, **self.plan.env, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: Ctrl-C reaches us, and we stop it in order
            preexec_fn=_die_with_parent,
        )
        self._reader = threading.Thread(target=self._read_output, name="engine-log", daemon=True)
        self._reader.start()

    def progress(self) -> EngineProgress:
        last = self._lines[-1] if self._lines else ""
        return EngineProgress(self._phase, time.monotonic() - self._started, last)

    def returncode(self) -> int | None:
        """None while the engine runs; its exit status once it has exited."""
        return None if self._proc is None else self._proc.poll()

    def listens(self) -> bool:
        """Whether this engine (its process or one it started) is what listens on its port: a /health answer
        from that port proves nothing when another server took it."""
        if self._proc is None or self._proc.poll() is not None:
            return False
        try:
            root = psutil.Process(self._proc.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return False
        for process in tree:
            with contextlib.suppress(psutil.Error):
                for conn in process.net_connections(kind="tcp"):
                    if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == self.plan.port:
                        return True
        return False

    def last_lines(self, n: int = 20) -> list[str]:
        return list(self._lines)[-n:]

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the engine's process group, then SIGKILL whatever is left after `timeout`."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        _signal_group(proc.pid, signal.SIGKILL)  # children the engine left behind, if any
        proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)

    def _read_output(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        with self.log_path.open("ab") as log:
            for raw in self._proc.stdout:
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace").rstrip()
                if not line:
                    continue
                self._lines.append(line)
                self._phase = next((phase for pattern, phase in _PHASES if pattern.search(line)), self._phase)
                if match := _KV_TOKENS.search(line):
                    self._kv_tokens = int(match.group(1).replace(",", ""))


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _die_with_parent() -> None:
    """In the child: if deploykit itself is killed, the kernel sends the engine SIGTERM."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: the engine outlives a killed parent, as any child would
