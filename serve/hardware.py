"""What this machine has to run an engine on: NVIDIA GPUs (via nvidia-smi), else CPU cores and RAM."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field, replace

from deploykit.core.errors import UsageError

_NVIDIA_SMI_QUERY = "index,name,memory.total,memory.free,compute_cap"


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_bytes: int
    free_bytes: int
    compute_capability: float

    @property
    def supports_bfloat16(self) -> bool:
        return self.compute_capability >= 8.0


@dataclass(frozen=True)
class Hardware:
    """A machine: its GPUs (possibly none), usable CPU cores, and RAM."""

    cpu_ids: tuple[int, ...]
    ram_total_bytes: int
    ram_available_bytes: int
    gpus: tuple[Gpu, ...] = field(default_factory=tuple)
    shares_cores: bool = False  # a share whose cores other engines are bound to as well (split)

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    @property
    def cpu_cores(self) -> int:
        return len(self.cpu_ids)

    def split(self, n: int) -> list[Hardware]:
        """Shares for n engines: each its own equal group of GPUs, or on the CPU an n-th of the available RAM
        and, when there are more cores than engines, cores of its own to bind its threads to, with the last
        core (which the plan leaves to the gateway) in every share. With fewer, the engines share the cores
        but the gateway's: an engine spins on the cores it is bound to, and a gateway starved of its core
        fails the engines' health checks (measured: two engines on a core each of two)."""
        if n == 1:
            return [self]
        if self.gpus:
            if len(self.gpus) < n:
                raise UsageError(
                    f"{n} engines need at least {n} GPUs; this machine has {len(self.gpus)}.",
                    "Lower --replicas, or serve fewer models from this gateway.",
                )
            per = len(self.gpus) // n
            return [replace(self, gpus=self.gpus[i * per : (i + 1) * per]) for i in range(n)]
        cores, ram = self.cpu_ids, self.ram_available_bytes // n
        if len(cores) <= n:  # no core each and one for the gateway: the engines share all but the gateway's
            return [replace(self, ram_available_bytes=ram, shares_cores=True) for _ in range(n)]
        per = (len(cores) - 1) // n
        return [
            replace(self, ram_available_bytes=ram, cpu_ids=(*cores[i * per : (i + 1) * per], cores[-1]))
            for i in range(n)
        ]


def detect_hardware() -> Hardware:
    total, available = _read_meminfo()
    return Hardware(
        cpu_ids=tuple(sorted(os.sched_getaffinity(0))),
        ram_total_bytes=total,
        ram_available_bytes=available,
        gpus=tuple(_query_nvidia_smi()),
    )


def parse_nvidia_smi(output: str) -> list[Gpu]:
    """Parse `nvidia-smi --query-gpu=index,name,memory.total,memory.free,compute_cap --format=csv,noheader,nounits`."""
    gpus = []
    for line in output.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4:
            continue
        index, name, total_mib, free_mib = parts[:4]
        try:
            capability = float(parts[4]) if len(parts) > 4 else 0.0
        except ValueError:
            capability = 0.0  # older drivers answer "[N/A]"
        gpus.append(
            Gpu(
                index=int(index),
                name=name,
                memory_bytes=int(float(total_mib)) * 1024**2,
                free_bytes=int(float(free_mib)) * 1024**2,
                compute_capability=capability,
            )
        )
    return gpus


def _query_nvidia_smi() -> list[Gpu]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        result = subprocess.run(
            [exe, f"--query-gpu={_NVIDIA_SMI_QUERY}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return []  # a driver that does not answer means no usable GPU
    return parse_nvidia_smi(result.stdout)


def _read_meminfo() -> tuple[int, int]:
    fields: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0]) * 1024
    total = fields["MemTotal"]
    return total, fields.get("MemAvailable", total)
