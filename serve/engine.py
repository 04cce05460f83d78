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

from deploykit.serve.plan import LaunchPlan, vllm_cache_root

# Start-up phases, recognised from vLLM's log lines, in the order they happen (CPU and GPU engines): the key
# (for /ready and scripts), its short name, what the progress display says, and the log line that starts
# it. The first begins with the process.
_PHASES: tuple[tuple[str, str, str, re.Pattern[str] | None], ...] = (
    ("imports", "imports", "importing vLLM", None),
    ("setup", "set-up", "setting up the engine", re.compile(r"non-default args|Resolved architecture")),
    (
        "weights",
        "weights",
        "loading weights",
        re.compile(r"Starting to load model|Loading weights|Loading safetensors"),
    ),
    (
        "compile",
        "compile",
        "compiling and warming up",
        re.compile(r"Warming up model|Starting torch\.compile|Compiling a graph|Directly load"),
    ),
    (
        "kv_cache",
        "KV cache",
        "allocating the KV cache",
        re.compile(r"Memory profiling|Available KV cache memory|KV cache size"),
    ),
    ("cuda_graphs", "CUDA graphs", "capturing CUDA graphs", re.compile(r"Capturing CUDA graph")),
    (
        "api",
        "API",
        "opening the API",
        re.compile(r"init engine|Starting vLLM (API )?server|Application startup complete"),
    ),
)
_ORDER = [key for key, _, _, _ in _PHASES]
_SHORT = {key: short for key, short, _, _ in _PHASES}
_LABELS = {key: label for key, _, label, _ in _PHASES}
# Whether compiled graphs came from a cache. The GPU engine says so in its log; the CPU engine says nothing,
# and a start that compiled is one that wrote to inductor's cache.
_CACHE_HIT = re.compile(r"Directly load")
_CACHE_MISS = re.compile(r"Compiling a graph|Compiling model again")
_KV_TOKENS = re.compile(r"KV cache size: ([\d,]+) tokens")
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class EngineProgress:
    phase: str
    elapsed_s: float
    last_line: str


@dataclass(frozen=True)
class Startup:
    """How one start went: seconds to ready, each phase's share, and whether compiled graphs were reused."""

    seconds: float
    phases: tuple[tuple[str, float], ...]  # (key, seconds), in order; they add up to `seconds`
    compile_cache: str | None  # "hit", "miss", or None when the engine gives no sign

    def describe(self) -> str:
        parts = [f"{_SHORT[key]} {s:.0f} s" for key, s in self.phases]
        cache = {"hit": "; compiled graphs from the cache", "miss": "; compiled (cached for the next start)"}
        return ", ".join(parts) + cache.get(self.compile_cache or "", "")

    def as_dict(self) -> dict[str, object]:
        return {
            "ready_s": round(self.seconds, 1),
            "phases_s": {key: round(s, 1) for key, s in self.phases},
            "compile_cache": self.compile_cache,
        }


class EngineProcess:
    """One engine process started from a plan; `stop()` ends it and everything it spawned."""

    def __init__(self, plan: LaunchPlan, log_path: Path, *, tail: int = 40) -> None:
        self.plan = plan
        self.log_path = log_path
        self._lines: collections.deque[str] = collections.deque(maxlen=tail)
        self._phases: list[tuple[str, float]] = [("imports", 0.0)]  # (key, seconds after the start it began)
        self._kv_tokens: int | None = None
        self._cache_said: str | None = None  # what the engine's log said of its compile cache
        self._cache_dirs: tuple[Path, ...] = ()
        self._cache_files = 0
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
        env = {**os.environ, **self.plan.env, "PYTHONUNBUFFERED": "1"}
        self._phases, self._cache_said = [("imports", 0.0)], None
        # where a compile leaves files: inductor's cache, and vLLM's (its AOT cache puts inductor's there too)
        inductor = (Path(env["TORCHINDUCTOR_CACHE_DIR"]),) if env.get("TORCHINDUCTOR_CACHE_DIR") else ()
        self._cache_dirs = (*inductor, vllm_cache_root(env))
        self._cache_files = _count_files(self._cache_dirs)
        self._started = time.monotonic()
        self._proc = subprocess.Popen(
            self.plan.argv,
            env=env,
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
        return EngineProgress(_LABELS[self._phases[-1][0]], time.monotonic() - self._started, last)

    def startup(self, seconds: float) -> Startup:
        """How this start went, for an engine that became ready `seconds` after it was started."""
        ends = [t for _, t in self._phases[1:]] + [seconds]
        phases = tuple((key, max(0.0, end - t)) for (key, t), end in zip(self._phases, ends, strict=True))
        cache = self._cache_said
        compiled = any(key == "compile" for key, _ in phases)  # an eager engine (LoRA on CPU, say) has no phase
        if cache is None and compiled:
            cache = "miss" if _count_files(self._cache_dirs) > self._cache_files else "hit"
        return Startup(seconds, phases, cache)

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
                self._note(line)
                if match := _KV_TOKENS.search(line):
                    self._kv_tokens = int(match.group(1).replace(",", ""))

    def _note(self, line: str) -> None:
        """Advance the phase, never back: a later line may use an earlier phase's words."""
        current = _ORDER.index(self._phases[-1][0])
        for index, (key, _, _, pattern) in enumerate(_PHASES):
            if index > current and pattern is not None and pattern.search(line):
                self._phases.append((key, time.monotonic() - self._started))
                break
        if _CACHE_HIT.search(line):
            self._cache_said = "hit"
        elif _CACHE_MISS.search(line):
            self._cache_said = "miss"


def _count_files(folders: tuple[Path, ...]) -> int:
    """Files under `folders`, one nested in another counted once: a start that compiled adds some to a cache."""
    tops = {str(f.resolve()) for f in folders}
    tops = {t for t in tops if not any(t.startswith(o.rstrip("/") + "/") for o in tops)}
    return sum(len(files) for top in tops for _, _, files in os.walk(top))


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
