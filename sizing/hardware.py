"""What an engine replica runs on: a GPU from the data file (its datasheet figures at vLLM's efficiency), or
this machine's CPU, measured (CPUs vary too much for a data file), and the KV cache each holds."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import psutil

from deploykit.core.errors import MissingDependencyError, NotFoundError
from deploykit.models.config import ModelConfig
from deploykit.models.fit import (
    GIB,
    cpu_dtype,
    cpu_kv_gib,
    fit_on,
    gpu_usable_bytes,
    kv_bytes_per_token,
    kv_cache_tokens,
    vllm_batching,
)
from deploykit.models.prices import Efficiency, GpuSpec, Prices

_COPY_BYTES = 256 * 1024**2
_MATMUL_N = 1024


@dataclass(frozen=True)
class Accelerator:
    """One device an engine runs on: a GPU from the data file, or this machine's CPU as measured."""

    name: str
    label: str
    memory_bytes: int
    bandwidth: float  # bytes/s
    flops: float  # FLOP/s, 16-bit on GPUs, float32 on CPUs
    bf16: bool
    power_w: float
    bandwidth_eff: float  # share of `bandwidth` decode achieves
    compute_eff: float  # share of `flops` prefill and batched decode achieve
    is_cpu: bool = False  # a CPU core streams weights and computes in turn: decode pays memory plus compute

    @classmethod
    def from_spec(cls, spec: GpuSpec, eff: Efficiency) -> Accelerator:
        return cls(
            name=spec.name,
            label=spec.label,
            memory_bytes=int(spec.memory_gib * GIB),
            bandwidth=spec.bandwidth_gbps * 1e9,
            flops=spec.tflops * 1e12,
            bf16=spec.bf16,
            power_w=spec.power_w,
            bandwidth_eff=eff.bandwidth,
            compute_eff=eff.compute,
        )

    def dtype(self, config: ModelConfig) -> str:
        if self.is_cpu:
            return cpu_dtype(config)
        return "bfloat16" if self.bf16 else "float16"


def kv_tokens_on(config: ModelConfig, dev: Accelerator, tp: int) -> int:
    """KV cache tokens one replica holds: the GPU fit check, or the CPU engine's KV space rule."""
    dtype = dev.dtype(config)
    if dev.is_cpu:
        kv_gib, _, _ = cpu_kv_gib(config, dtype, dev.memory_bytes)
        return kv_cache_tokens(kv_gib * GIB, kv_bytes_per_token(config, dtype))
    batching = vllm_batching(dev.memory_bytes, dev.name)
    return fit_on(config, dtype, tp, gpu_usable_bytes(dev.memory_bytes), 1, batching).kv_cache_tokens


class HardwareByName(Mapping[str, Accelerator]):
    """Every GPU in the data, and "cpu": this machine, measured the first time it is asked for (a second
    or two of copying and multiplying, so only when needed)."""

    def __init__(self, prices: Prices) -> None:
        if prices.efficiency is None:
            raise NotFoundError("The price data has no [efficiency] table.", "Restore the shipped gpus.toml.")
        self.prices, self.efficiency = prices, prices.efficiency
        self._cpu: Accelerator | None = None

    def __getitem__(self, name: str) -> Accelerator:
        if name != "cpu":
            return Accelerator.from_spec(self.prices.gpu(name), self.efficiency)  # NotFoundError names the known
        if self._cpu is None:
            self._cpu = measure_cpu()
        return self._cpu

    def __contains__(self, name: object) -> bool:
        return name == "cpu" or name in self.prices.gpus

    def __iter__(self) -> Iterator[str]:
        return iter([*self.prices.gpus, "cpu"])

    def __len__(self) -> int:
        return len(self.prices.gpus) + 1


def engine_cores() -> int:
    return max(1, (os.cpu_count() or 1) - 1)


def measure_cpu() -> Accelerator:
    """Best of a few runs: bytes/s of a large copy (read + write) and FLOP/s of a float32 matmul."""
    try:
        import numpy as np
    except ImportError as e:
        raise MissingDependencyError(
            "Measuring this CPU needs numpy.", "Install deploykit with the cpu extra, or pip install numpy."
        ) from e
    source = np.ones(_COPY_BYTES // 4, dtype=np.float32)
    target = np.empty_like(source)
    copy = min(_timed(lambda: np.copyto(target, source)) for _ in range(3))
    a = np.ones((_MATMUL_N, _MATMUL_N), dtype=np.float32)
    matmul = min(_timed(lambda: a @ a) for _ in range(5))
    cores = engine_cores()
    flops = 2 * _MATMUL_N**3 / matmul
    threads = _blas_threads()
    per_core = flops / max(1, min(threads, os.cpu_count() or 1))
    return Accelerator(
        name="cpu",
        label=f"this CPU ({cores} engine core{'s' if cores > 1 else ''}, measured)",
        memory_bytes=psutil.virtual_memory().available,
        bandwidth=2 * _COPY_BYTES / copy,
        flops=per_core * cores,
        bf16=False,
        power_w=0,
        bandwidth_eff=1.0,  # measured figures are already what software gets
        compute_eff=1.0,
        is_cpu=True,
    )


def _timed(run: object) -> float:
    start = time.perf_counter()
    run()  # type: ignore[operator]
    return time.perf_counter() - start


def _blas_threads() -> int:
    """Threads numpy's BLAS used for the matmul (OpenBLAS and MKL honour these variables)."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return os.cpu_count() or 1
