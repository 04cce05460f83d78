"""Memory arithmetic shared by the launch plan and the fit check: weights and KV cache in bytes."""

from __future__ import annotations

from deploykit.models.config import ModelConfig

DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}

GIB = 1024**3


def dtype_bytes(dtype: str) -> int:
    return DTYPE_BYTES.get(dtype, 2)


def weight_bytes(config: ModelConfig, dtype: str) -> int:
    """Bytes the weights take in memory when loaded as `dtype`."""
    return config.params * dtype_bytes(dtype)


def kv_bytes_per_token(config: ModelConfig, dtype: str) -> int:
    """KV cache bytes one token takes: a key and a value per layer per KV head."""
    return 2 * config.layers * config.kv_heads * config.head_dim * dtype_bytes(dtype)
