"""A planned machine: the GPUs a deployment will run on, named as `size` names them (h100-sxm:8), so that
launch plans can be made here for hardware this machine does not have."""

from __future__ import annotations

from deploykit.core.errors import UsageError
from deploykit.models.fit import GIB
from deploykit.models.prices import Prices
from deploykit.serve.hardware import Gpu, Hardware

# What the plan reads of a GPU's compute capability is whether it computes bfloat16 fast (>= 8.0).
_WITH_BF16, _WITHOUT_BF16 = 8.0, 7.5


def planned_machine(spec: str, prices: Prices) -> Hardware:
    """GPU:COUNT (h100-sxm:8; COUNT defaults to 1) as a Hardware whose GPUs are all free."""
    name, _, count_text = spec.partition(":")
    try:
        count = int(count_text or 1)
    except ValueError:
        count = 0
    if count < 1:
        raise UsageError(f"--gpus '{spec}' is not GPU:COUNT.", "For example --gpus h100-sxm:8.")
    gpu = prices.gpu(name)  # NotFoundError names the known ones
    memory = int(gpu.memory_gib * GIB)
    capability = _WITH_BF16 if gpu.bf16 else _WITHOUT_BF16
    gpus = tuple(Gpu(i, gpu.label, memory, memory, capability) for i in range(count))
    return Hardware(cpu_ids=tuple(range(16)), ram_total_bytes=256 * GIB, ram_available_bytes=256 * GIB, gpus=gpus)
