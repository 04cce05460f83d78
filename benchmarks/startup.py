"""Start to ready: `deploykit serve` against the bare engine command with the same flags, side by side.

    python benchmarks/startup.py [MODEL] [--rounds 1] [-- ENGINE_ARGS...]

The bare command is the one `deploykit serve MODEL --dry-run --json` prints (same flags, same
environment); it is ready when the engine's /health answers 200. deploykit is ready when the gateway's
/ready answers 200. Rounds alternate which goes first; torch.compile's cache is warmed by a first,
untimed start. Prints each time and the ratio deploykit / bare.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from deploykit.core.ports import free_port

BIN = Path(sys.executable).parent


def time_until_ok(argv: list[str], env: dict[str, str], url: str, timeout: float = 900) -> float:
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        with httpx.Client(timeout=1) as probe:  # one client: a new one per probe costs CPU the engine needs
            while time.monotonic() - start < timeout:
                if proc.poll() is not None:
                    raise SystemExit(f"{argv[:4]} exited with {proc.returncode}")
                try:
                    if probe.get(url).status_code == 200:
                        return time.monotonic() - start
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise SystemExit(f"not ready after {timeout} s")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> None:
    argv = sys.argv[1:]
    engine_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)

    def bare() -> float:
        port = free_port()
        cmd = [str(BIN / "deploykit"), "serve", args.model, "--dry-run", "--json", "--engine-port", str(port)]
        plan = json.loads(subprocess.run([*cmd, "--", *engine_args], capture_output=True, check=True).stdout)
        return time_until_ok(plan["argv"], {**os.environ, **plan["env"]}, f"http://127.0.0.1:{port}/health")

    def deploykit() -> float:
        port = free_port()
        cmd = [str(BIN / "deploykit"), "serve", args.model, "--port", str(port), "--", *engine_args]
        return time_until_ok(cmd, dict(os.environ), f"http://127.0.0.1:{port}/ready")

    print("warming the compile cache (untimed) ...", flush=True)
    bare()
    times: dict[str, list[float]] = {"bare": [], "deploykit": []}
    for r in range(args.rounds):
        order = [("bare", bare), ("deploykit", deploykit)][:: 1 if r % 2 == 0 else -1]
        for name, start in order:
            times[name].append(start())
            print(f"round {r + 1}: {name:>9} ready in {times[name][-1]:.1f} s", flush=True)
    b, d = sum(times["bare"]) / args.rounds, sum(times["deploykit"]) / args.rounds
    print(f"mean: bare {b:.1f} s, deploykit {d:.1f} s, ratio deploykit/bare {d / b:.3f}")


if __name__ == "__main__":
    main()
