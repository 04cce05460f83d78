"""Memory arithmetic shared by the launch plan and the fit check: weights and KV cache in bytes, and
whether a model fits a set of devices (GPUs in tensor parallel, or the CPU's RAM)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from deploykit.models.config import ModelConfig

DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}

GIB = 1024**3
# vLLM allocates KV cache in blocks of this many tokens; capacities round down to it.
KV_BLOCK_TOKENS = 16
# vLLM's default share of each GPU's memory (--gpu-memory-utilization).
GPU_MEMORY_UTILIZATION = 0.90
# Per GPU, beyond weights and KV cache: CUDA context, activations, CUDA graphs (an estimate).
GPU_RUNTIME_OVERHEAD = int(1.5 * GIB)
# On CPU, beyond weights and KV cache: the Python processes, torch and compiled kernels.
CPU_RUNTIME_OVERHEAD = 2 * GIB
# On CPU, KV cache sized to hold this many full-context sequences, where RAM allows.
CPU_KV_SEQUENCES = 4


def dtype_bytes(dtype: str) -> int:
    return DTYPE_BYTES.get(dtype, 2)


def weight_bytes(config: ModelConfig, dtype: str) -> int:
    """Bytes the weights take in memory when loaded as `dtype`."""
    return config.params * dtype_bytes(dtype)


def kv_bytes_per_token(config: ModelConfig, dtype: str) -> int:
    """KV cache bytes one token takes: a key and a value per layer per KV head."""
    return 2 * config.layers * config.kv_heads * config.head_dim * dtype_bytes(dtype)


def kv_cache_tokens(kv_bytes: int, bytes_per_token: int) -> int:
    """Tokens a KV cache of `kv_bytes` holds, rounded down to whole blocks as vLLM does."""
    return max(0, kv_bytes) // bytes_per_token // KV_BLOCK_TOKENS * KV_BLOCK_TOKENS


@dataclass(frozen=True)
class Fit:
    """How a model sits on `devices` devices that each give it `budget_bytes` (after runtime overhead)."""

    devices: int
    dtype: str
    weight_bytes_per_device: int
    kv_cache_tokens: int
    max_context: int  # the longest sequence the KV cache holds, at most the model's context
    min_context: int  # the shortest context counted as fitting

    @property
    def fits(self) -> bool:
        return self.max_context >= self.min_context

    def concurrent_sequences(self, seq_len: int) -> int:
        """How many sequences of `seq_len` tokens the KV cache holds at once."""
        return self.kv_cache_tokens // seq_len


def fit_on(config: ModelConfig, dtype: str, devices: int, budget_bytes: int, min_context: int) -> Fit:
    """Weights split evenly over `devices` (tensor parallel); whatever each has left holds KV cache."""
    per_device = weight_bytes(config, dtype) // devices
    kv_bytes = devices * (budget_bytes - per_device)
    tokens = kv_cache_tokens(kv_bytes, kv_bytes_per_token(config, dtype))
    return Fit(
        devices=devices,
        dtype=dtype,
        weight_bytes_per_device=per_device,
        kv_cache_tokens=tokens,
        max_context=min(config.max_context, tokens),
        min_context=min(config.max_context, min_context),
    )


def gpu_budget_bytes(memory_bytes: int) -> int:
    """Bytes of a GPU with `memory_bytes` that the engine gives to weights and KV cache."""
    return int(memory_bytes * GPU_MEMORY_UTILIZATION) - GPU_RUNTIME_OVERHEAD


def tensor_parallel_sizes(config: ModelConfig, gpu_count: int) -> list[int]:
    """The tensor-parallel sizes vLLM accepts here: powers of two that divide the attention heads."""
    return [tp for tp in (1, 2, 4, 8) if tp <= gpu_count and config.attention_heads % tp == 0]


def cpu_dtype(config: ModelConfig) -> str:
    """float32 for small models (cheap, and bfloat16 on CPUs can answer garbage), else bfloat16."""
    return "float32" if config.is_small else "bfloat16"


def cpu_kv_gib(config: ModelConfig, dtype: str, ram_available_bytes: int) -> tuple[int, int, int]:
    """The CPU engine's KV cache in GiB (VLLM_CPU_KVCACHE_SPACE): CPU_KV_SEQUENCES full-context sequences,
    at most half the RAM left after weights and runtime, at least 1. Returns (chosen, wanted, cap)."""
    room = ram_available_bytes - weight_bytes(config, dtype) - CPU_RUNTIME_OVERHEAD
    wanted = math.ceil(CPU_KV_SEQUENCES * config.max_context * kv_bytes_per_token(config, dtype) / GIB)
    cap = int(room // 2 // GIB)
    return max(1, min(wanted, cap)), wanted, cap
