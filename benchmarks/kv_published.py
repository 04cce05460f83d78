"""The KV cache capacity model against vLLM's own startup logs (benchmarks/kv_logs.toml).

    .venv/bin/python -m benchmarks.kv_published

For each log: the KV cache vLLM was left with, against models/fit.py's prediction for the same GPU, model,
tensor parallelism, memory share and batching (the code `serve`, `size` and `cost` use), and against the
flat 1.5 GiB per GPU it used before. A row counts as reproduced within 10%. Rows a model constant was fitted
on are marked and counted apart. Then each term (activation, memory outside torch, CUDA graphs) against what
the log says. The output is the tables in docs/SIZING.md.
"""

from __future__ import annotations

import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploykit.models.catalog import load_catalog
from deploykit.models.fit import GIB, Batching, Runtime, gpu_runtime, weight_bytes

LOGS = Path(__file__).with_name("kv_logs.toml")
BAND = 0.10
FLAT_RUNTIME_GIB = 1.5  # the model before 2026-12-07: 1.5 GiB per GPU whatever the model and engine


@dataclass(frozen=True)
class Check:
    log: dict[str, Any]
    weights: float  # GiB per GPU, predicted
    runtime: Runtime
    kv: float  # GiB per GPU, predicted
    flat_kv: float
    graphs: float  # GiB, the CUDA graph estimate a vLLM from 0.21 on would take off

    @property
    def error(self) -> float:
        return float(self.kv / self.log["kv"] - 1)

    @property
    def flat_error(self) -> float:
        return float(self.flat_kv / self.log["kv"] - 1)

    @property
    def fitted(self) -> bool:
        return "fitted" in self.log


def load_logs() -> list[dict[str, Any]]:
    return list(tomllib.loads(LOGS.read_text())["log"])


def check(log: dict[str, Any]) -> Check:
    config = load_catalog().get(log["model"]).config()
    tp = int(log["tp"])
    batching = Batching(int(log["max_num_seqs"]), int(log["max_num_batched_tokens"]))
    runtime = gpu_runtime(config, "bfloat16", tp, batching, cuda_graphs=bool(log["cuda_graphs_counted"]))
    usable = log["gpu_gib"] * log["utilization"]
    weights = weight_bytes(config, "bfloat16") / tp / GIB
    graphs = gpu_runtime(config, "bfloat16", tp, batching).cuda_graphs / GIB
    kv, flat = usable - weights - runtime.total / GIB, usable - weights - FLAT_RUNTIME_GIB
    return Check(log, weights, runtime, kv, flat, graphs)


def main() -> None:
    checks = [check(log) for log in load_logs()]
    print("| log | vLLM | KV cache logged | flat 1.5 GiB: predicted, error | now: predicted, error | within 10% |")
    print("|---|---|---|---|---|---|")
    for c in checks:
        verdict = "fitted" if c.fitted else "yes" if abs(c.error) <= BAND else "**no**"
        print(
            f"| {c.log['label']} | {c.log['vllm']} | {c.log['kv']:.2f} GiB | {c.flat_kv:.2f} GiB, {c.flat_error:+.0%} "
            f"| {c.kv:.2f} GiB, {c.error:+.1%} | {verdict} |"
        )
    independent = [c for c in checks if not c.fitted]
    hits = sum(abs(c.error) <= BAND for c in independent)
    flat = sum(abs(c.flat_error) <= BAND for c in independent)
    print(
        f"\n{hits} of {len(independent)} independent logs reproduced within ±{BAND:.0%} "
        f"(the flat 1.5 GiB: {flat} of {len(independent)}); {len(checks) - len(independent)} more set constants."
    )
    print(
        "\n| log | weights logged / predicted | activation logged / predicted | outside torch logged / predicted "
        "| CUDA graphs estimate logged / predicted |"
    )
    print("|---|---|---|---|---|")
    for c in checks:
        logged = c.log.get("cuda_graphs_estimate")
        graphs = (
            "-"
            if logged is None
            else f"{logged:.2f} / {c.graphs:.2f}" + (" (fitted)" if c.log.get("fitted_graphs") else "")
        )
        print(
            f"| {c.log['label']} | {c.log['weights']:.2f} / {c.weights:.2f} "
            f"| {c.log['activation']:.2f} / {c.runtime.activation / GIB:.2f} "
            f"| {c.log['non_torch']:.2f} / {c.runtime.non_torch / GIB:.2f} | {graphs} |"
        )


if __name__ == "__main__":
    main()
