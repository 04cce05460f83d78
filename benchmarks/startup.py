"""Start to ready, cold and warm, for four ways of starting the CPU engine; and `deploykit serve` beside it.

    python -m benchmarks.startup [MODEL] [--rounds 1] [--configs plan,vllm-default,eager]

Each configuration gets a compile cache of its own, empty at first (a temporary VLLM_CACHE_ROOT, with
inductor's cache under it): its first start is cold, the next `--rounds` are warm. Configurations:
  plan          what `deploykit serve` runs: vLLM's AOT compile cache off, inductor's cache reused, the
                engine core in the API server's process
  multiproc     the plan with vLLM's default process layout (engine core in a process of its own)
  vllm-default  the plan with vLLM's default AOT compile cache on (and its default process layout)
  eager         the plan with --enforce-eager (no torch.compile at all)
The engine is started from the launch plan (`deploykit.serve.runner.prepare`) and is ready when its /health
answers 200; each start's phases are read from its log as `serve` reads them. On each warm engine, decode
speed: one greedy stream of 128 tokens (after one untimed request), the median of 3, in tokens/s; and
throughput: 48 requests of 64 greedy tokens, 16 at a time, output tokens/s. Last,
`--rounds` warm `deploykit serve` starts (ready when the gateway's /ready answers 200, which also gives
the engine's own phases) against the plan's warm bare starts: what deploykit adds to a start. Prints
every time and the ratios.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx

from deploykit.core.ports import free_port
from deploykit.core.settings import Settings
from deploykit.serve.engine import EngineProcess, Startup
from deploykit.serve.plan import LaunchPlan
from deploykit.serve.runner import prepare

BIN = Path(sys.executable).parent
CONFIGS = ("plan", "multiproc", "vllm-default", "eager")
# What the CPU plan decides; left out of this process's environment, so that the plan decides them here
# as it does for a user who set none, and no engine inherits a value from the shell
PLAN_DECIDES = ("VLLM_USE_AOT_COMPILE", "TORCHINDUCTOR_CACHE_DIR", "VLLM_ENABLE_V1_MULTIPROCESSING")


def plan_for(model: str, config: str, cache_root: Path) -> LaunchPlan:
    environ = {**os.environ, "VLLM_CACHE_ROOT": str(cache_root)}
    [plan] = prepare(Settings(), [model], engine_port=free_port(), environ=environ)
    env = {**plan.env, "VLLM_CACHE_ROOT": str(cache_root)}
    if config in ("multiproc", "vllm-default"):
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
    if config == "vllm-default":
        env.pop("VLLM_USE_AOT_COMPILE")
    argv = (*plan.argv, "--enforce-eager") if config == "eager" else plan.argv
    return replace(plan, env=env, argv=argv)


def start(plan: LaunchPlan, log: Path, timeout: float = 900) -> tuple[EngineProcess, Startup]:
    engine = EngineProcess(plan, log)
    began = time.monotonic()
    engine.start()
    with httpx.Client(timeout=1) as probe:  # one client: a new one per probe costs CPU the engine needs
        while time.monotonic() - began < timeout:
            if engine.returncode() is not None:
                engine.stop()
                raise SystemExit(f"the engine exited with {engine.returncode()}; its log: {log}")
            try:
                if probe.get(plan.url + "/health").status_code == 200:
                    return engine, engine.startup(time.monotonic() - began)
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    engine.stop()
    raise SystemExit(f"not ready after {timeout} s; its log: {log}")


def decode_tokens_per_s(plan: LaunchPlan, tokens: int = 128) -> float:
    body = {
        "model": plan.served_name,
        "prompt": "Once upon a time",
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    speeds = []
    with httpx.Client(timeout=300) as client:
        for i in range(4):
            began = time.monotonic()
            reply = client.post(plan.url + "/v1/completions", json=body).raise_for_status().json()
            if i:  # the first warms the engine's buffers
                speeds.append(reply["usage"]["completion_tokens"] / (time.monotonic() - began))
    return statistics.median(speeds)


def throughput_tokens_per_s(plan: LaunchPlan, streams: int = 16, requests: int = 48, tokens: int = 64) -> float:
    body = {"model": plan.served_name, "prompt": "Once upon a time", "max_tokens": tokens, "temperature": 0}
    body["ignore_eos"] = True

    def one(_: int) -> int:
        with httpx.Client(timeout=300) as client:
            reply = client.post(plan.url + "/v1/completions", json=body).raise_for_status().json()
            return int(reply["usage"]["completion_tokens"])

    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        total = sum(pool.map(one, range(requests)))
    return total / (time.monotonic() - began)


def serve_start(model: str, cache_root: Path, timeout: float = 900) -> tuple[float, dict[str, object]]:
    """Seconds until `deploykit serve`'s /ready answers 200, and the engine's own start as /ready gives it."""
    port = free_port()
    env = {**os.environ, "VLLM_CACHE_ROOT": str(cache_root)}
    cmd = [str(BIN / "deploykit"), "serve", model, "--port", str(port)]
    began = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(timeout=1) as probe:
            while time.monotonic() - began < timeout:
                if proc.poll() is not None:
                    raise SystemExit(f"deploykit serve exited with {proc.returncode}")
                try:
                    ready = probe.get(f"http://127.0.0.1:{port}/ready")
                    if ready.status_code == 200:
                        seconds = time.monotonic() - began
                        [startup] = ready.json()["startup"][model].values()
                        return seconds, startup
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise SystemExit(f"deploykit serve not ready after {timeout} s")
    finally:
        proc.terminate()
        proc.wait(120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=1, help="warm starts per configuration")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"a subset of {','.join(CONFIGS)}")
    args = parser.parse_args()
    configs = args.configs.split(",")
    for name in PLAN_DECIDES:
        os.environ.pop(name, None)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as tmp:
        for config in configs:
            root = Path(tmp) / config
            times, speed, tput = [], 0.0, 0.0
            for i in range(1 + args.rounds):
                plan = plan_for(args.model, config, root)
                engine, startup = start(plan, Path(tmp) / f"{config}-{i}.log")
                try:
                    kind = "cold" if i == 0 else "warm"
                    last = i == args.rounds
                    if last:
                        speed, tput = decode_tokens_per_s(plan), throughput_tokens_per_s(plan)
                finally:
                    engine.stop()
                times.append(startup.seconds)
                decode = f", decode {speed:.1f} tok/s, 16 streams {tput:.0f} tok/s" if last else ""
                print(f"{config:>12} {kind}: ready in {startup.seconds:.1f} s{decode}", flush=True)
                print(f"{'':>12}   {startup.describe()}", flush=True)
            results[config] = {"cold": times[0], "warm": statistics.mean(times[1:]), "decode": speed, "tput": tput}
        if "plan" in results:
            served = []
            for _ in range(args.rounds):
                seconds, startup = serve_start(args.model, Path(tmp) / "plan")
                served.append(seconds)
                print(f"deploykit serve (plan) warm: ready in {seconds:.1f} s; the engine's own start: {startup}")
            results["serve"] = {"warm": statistics.mean(served)}

    print("\nconfig        cold s   warm s   decode tok/s (1 stream)   tok/s (16 streams)")
    for config in configs:
        r = results[config]
        print(f"{config:<12} {r['cold']:>7.1f} {r['warm']:>8.1f} {r['decode']:>12.1f} {r['tput']:>20.0f}")
    for other in ("multiproc", "vllm-default", "eager"):
        if "plan" in results and other in results:
            p, o = results["plan"], results[other]
            print(
                f"plan / {other}: warm start {p['warm'] / o['warm']:.2f}, decode {p['decode'] / o['decode']:.2f}, "
                f"16 streams {p['tput'] / o['tput']:.2f}"
            )
    if "serve" in results:
        ratio = results["serve"]["warm"] / results["plan"]["warm"]
        print(f"warm start deploykit serve / bare engine (plan): {ratio:.2f}")


if __name__ == "__main__":
    main()
