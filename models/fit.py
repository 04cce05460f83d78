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
# What vLLM keeps per GPU beside weights and KV cache (gpu_runtime), from its own startup logs
# (docs/SIZING.md, "KV cache capacity"; benchmarks/kv_published.py checks every log against the model):
# memory outside torch (CUDA libraries' workspaces; with tensor parallelism, NCCL and custom all-reduce
# buffers), as vLLM 0.19 logged it for Llama-3.1-8B at TP 1 and TP 2 ...
NON_TORCH_ONE_GPU = int(0.25 * GIB)
NON_TORCH_TENSOR_PARALLEL = int(2.1 * GIB)
# ... the activation peak of its profiling run: the sampler's float32 logits and their temporaries for
# max_num_seqs sequences (bytes per sequence per vocabulary entry), or the MLP's intermediates for
# max_num_batched_tokens tokens, whichever is larger, plus copies of the hidden state; the two factors
# fitted on the Llama-3.1-8B and Qwen2.5-7B logs ...
SAMPLER_BYTES_PER_LOGIT = 14.64
HIDDEN_STATE_COPIES = 1.59
# ... and, from vLLM 0.21, its estimate of the CUDA graphs' memory, fitted on the estimates logged for
# Llama-3.1-8B (32 layers) and Qwen2.5-72B (80 layers).
CUDA_GRAPHS_BASE = int(0.313 * GIB)
CUDA_GRAPHS_PER_LAYER = int(0.01646 * GIB)
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
class Batching:
    """How much vLLM batches in one step: its memory profiling runs a step this large."""

    max_num_seqs: int
    max_num_batched_tokens: int


def vllm_batching(memory_bytes: int, name: str) -> Batching:
    """vLLM's defaults for its OpenAI server on a GPU (vllm/engine/arg_utils.py, v0.10 to v0.32): larger on
    H100-class GPUs (70 GiB and more, A100 excepted) and larger still from 160 GiB."""
    if memory_bytes >= 160 * GIB:
        return Batching(1024, 16_384)
    if memory_bytes >= 70 * GIB and "a100" not in name.lower():
        return Batching(1024, 8192)
    return Batching(256, 2048)


@dataclass(frozen=True)
class Runtime:
    """Per GPU, what vLLM keeps beside weights and KV cache, in bytes."""

    non_torch: int  # outside torch: CUDA libraries' workspaces, NCCL and all-reduce buffers
    activation: int  # the peak of its profiling step
    cuda_graphs: int  # its estimate of the CUDA graphs (vLLM 0.21 onwards; 0 before)

    @property
    def total(self) -> int:
        return self.non_torch + self.activation + self.cuda_graphs


def gpu_runtime(config: ModelConfig, dtype: str, tp: int, batching: Batching, *, cuda_graphs: bool = True) -> Runtime:
    """What vLLM keeps per GPU beside weights and KV cache, for a replica on `tp` GPUs; `cuda_graphs`: a vLLM
    that takes its CUDA graphs' estimate off the KV cache, as 0.21 and later do."""
    width = dtype_bytes(dtype)
    sampler = batching.max_num_seqs * config.vocab_size * SAMPLER_BYTES_PER_LOGIT
    mlp = batching.max_num_batched_tokens * 3 * config.mlp_width // tp * width
    hidden = HIDDEN_STATE_COPIES * batching.max_num_batched_tokens * config.hidden_size * width
    return Runtime(
        non_torch=NON_TORCH_ONE_GPU if tp == 1 else NON_TORCH_TENSOR_PARALLEL,
        activation=int(max(sampler, mlp) + hidden),
        cuda_graphs=CUDA_GRAPHS_BASE + CUDA_GRAPHS_PER_LAYER * config.layers if cuda_graphs else 0,
    )


@dataclass(frozen=True)
class Fit:
    """How a model sits on `devices` devices: the weights each holds, and the KV cache they hold together."""

    devices: int
    dtype: str
    weight_bytes_per_device: int
    kv_cache_tokens: int
    max_context: int  # the longest sequence the KV cache holds, at most the model's context
    min_context: int  # the shortest context counted as fitting
    runtime_bytes_per_device: int = 0  # what vLLM keeps beside weights and KV cache on each GPU (gpu_runtime)

    @property
    def fits(self) -> bool:
        return self.max_context >= self.min_context

    def concurrent_sequences(self, seq_len: int) -> int:
        """How many sequences of `seq_len` tokens the KV cache holds at once."""
        return self.kv_cache_tokens // seq_len


def fit_on(
    config: ModelConfig,
    dtype: str,
    devices: int,
    usable_bytes: int,
    min_context: int,
    batching: Batching | None = None,
) -> Fit:
    """Weights split evenly over `devices` (tensor parallel); whatever each has left of `usable_bytes` holds KV
    cache. With `batching` the devices are GPUs and vLLM's runtime (gpu_runtime) comes off each first;
    without, `usable_bytes` is already net of it (the CPU engine's RAM)."""
    per_device = weight_bytes(config, dtype) // devices
    runtime = gpu_runtime(config, dtype, devices, batching).total if batching else 0
    kv_bytes = devices * (usable_bytes - per_device - runtime)
    tokens = kv_cache_tokens(kv_bytes, kv_bytes_per_token(config, dtype))
    return Fit(
        devices=devices,
        dtype=dtype,
        weight_bytes_per_device=per_device,
        kv_cache_tokens=tokens,
        max_context=min(config.max_context, tokens),
        min_context=min(config.max_context, min_context),
        runtime_bytes_per_device=runtime,
    )


def gpu_usable_bytes(memory_bytes: int) -> int:
    """Bytes of a GPU with `memory_bytes` that vLLM takes for itself (--gpu-memory-utilization)."""
    return int(memory_bytes * GPU_MEMORY_UTILIZATION)


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
