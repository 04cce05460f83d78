"""What vLLM keeps per GPU beside weights and KV cache (models/fit.py), checked against its own startup logs
(benchmarks/kv_logs.toml, the table in docs/SIZING.md), and the batching defaults it is profiled with."""

from __future__ import annotations

import pytest

from benchmarks.kv_published import BAND, check, load_logs
from deploykit.models.catalog import load_catalog
from deploykit.models.fit import (
    GIB,
    NON_TORCH_ONE_GPU,
    NON_TORCH_TENSOR_PARALLEL,
    Batching,
    fit_on,
    gpu_runtime,
    gpu_usable_bytes,
    vllm_batching,
)

LOGS = load_logs()
LLAMA_8B = load_catalog().get("llama-3.1-8b-instruct").config()
QWEN_72B = load_catalog().get("qwen2.5-72b-instruct").config()


def test_the_logs_cover_six_gpu_model_version_combinations_and_three_engine_versions() -> None:
    combinations = {(log["gpu_gib"], log["model"], log["vllm"]) for log in LOGS}
    assert len(combinations) >= 6
    assert len({log["vllm"].split()[0] for log in LOGS}) >= 3
    assert all(log["source"].startswith("https://") and log["captured"] for log in LOGS)


@pytest.mark.parametrize("log", [log for log in LOGS if "fitted" not in log], ids=lambda log: log["label"])
def test_every_independent_log_is_reproduced_within_ten_percent(log: dict[str, object]) -> None:
    assert abs(check(log).error) <= BAND


def test_the_tight_logs_the_flat_overhead_missed_are_the_ones_the_model_fixes() -> None:
    """A 72B model on two H100s left 3 GiB for KV cache: a flat 1.5 GiB a GPU said twice that."""
    tight = [check(log) for log in LOGS if log["kv"] < 5]
    assert len(tight) == 2
    for c in tight:
        assert abs(c.flat_error) > 0.25
        assert abs(c.error) <= BAND


def test_fitted_rows_are_marked_and_few() -> None:
    fitted = [log for log in LOGS if "fitted" in log]
    assert 1 <= len(fitted) <= len(LOGS) // 3


@pytest.mark.parametrize(
    ("gib", "name", "expected"),
    [
        (79.19, "NVIDIA H100 80GB HBM3", Batching(1024, 8192)),
        (139.8, "NVIDIA H200", Batching(1024, 8192)),
        (179.1, "NVIDIA B200", Batching(1024, 16_384)),
        (79.15, "NVIDIA A100-SXM4-80GB", Batching(256, 2048)),
        (80.0, "a100-80gb", Batching(256, 2048)),
        (22.5, "NVIDIA L4", Batching(256, 2048)),
        (69.9, "some 70 GB card", Batching(256, 2048)),
    ],
)
def test_vllms_batching_defaults_by_gpu(gib: float, name: str, expected: Batching) -> None:
    assert vllm_batching(int(gib * GIB), name) == expected


def test_runtime_terms() -> None:
    h100 = Batching(1024, 8192)
    one, two = gpu_runtime(LLAMA_8B, "bfloat16", 1, h100), gpu_runtime(LLAMA_8B, "bfloat16", 2, h100)
    assert (one.non_torch, two.non_torch) == (NON_TORCH_ONE_GPU, NON_TORCH_TENSOR_PARALLEL)
    assert one.activation == two.activation  # the sampler's logits are not split across GPUs
    assert one.total == one.non_torch + one.activation + one.cuda_graphs
    assert gpu_runtime(LLAMA_8B, "bfloat16", 1, h100, cuda_graphs=False).cuda_graphs == 0
    assert gpu_runtime(QWEN_72B, "bfloat16", 1, h100).cuda_graphs > one.cuda_graphs  # more layers, more graphs
    # a step of 32K tokens (chunked prefill off): the MLP's intermediates outgrow the sampler's logits
    long_step = gpu_runtime(LLAMA_8B, "bfloat16", 1, Batching(256, 32_768))
    assert long_step.activation > 2 * gpu_runtime(LLAMA_8B, "bfloat16", 1, Batching(256, 2048)).activation


def test_fit_takes_the_runtime_off_each_gpu_and_none_without_batching() -> None:
    usable = gpu_usable_bytes(int(79.19 * GIB))
    batching = Batching(1024, 8192)
    with_runtime = fit_on(LLAMA_8B, "bfloat16", 1, usable, 1, batching)
    bare = fit_on(LLAMA_8B, "bfloat16", 1, usable, 1)
    runtime = gpu_runtime(LLAMA_8B, "bfloat16", 1, batching).total
    per_token = 2 * 32 * 8 * 128 * 2
    assert (bare.kv_cache_tokens - with_runtime.kv_cache_tokens) == pytest.approx(runtime / per_token, abs=16)
    # two GPUs: each pays its own runtime, with tensor parallelism's buffers
    two = fit_on(LLAMA_8B, "bfloat16", 2, usable, 1, batching)
    two_runtime = gpu_runtime(LLAMA_8B, "bfloat16", 2, batching).total
    expected = (2 * (usable - two_runtime) - 2 * LLAMA_8B.params) // per_token
    assert two.kv_cache_tokens == pytest.approx(expected, abs=16)
