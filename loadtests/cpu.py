"""This machine's CPU as sizing hardware: its memory bandwidth and float32 matrix throughput, measured (CPUs
vary too much for a data file), on the cores the CPU engine computes on (all but one, as serve binds them)."""

from __future__ import annotations

import os
import time

import psutil

from deploykit.errors import MissingDependencyError
from deploykit.loadtests.sizing import Accelerator

_COPY_BYTES = 256 * 1024**2
_MATMUL_N = 1024


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
