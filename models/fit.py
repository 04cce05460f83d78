"""Memory arithmetic shared by the launch plan and the fit check: weights and KV cache in bytes, and
whether a model fits a set of devices (GPUs in tensor parallel, or the CPU's RAM)."""

from __future__ import annotations

from dataclasses import dataclass

from deploykit.models.config import ModelConfig

DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}

GIB = 1024**3
# vLLM allocates KV cache in blocks of this many tokens; capacities round down to it.
KV_BLOCK_TOKENS = 16


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
