"""`deploykit models show` and `models search --fits`: what a model is, what memory it needs at each dtype,
and whether it fits this machine, from the catalog or a local copy's config.json, before any download.

The fit uses the launch plan's own budgets (serve.plan), so `serve --dry-run` and `models show` agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from deploykit.core.errors import UnknownModelError
from deploykit.models.catalog import Catalog, CatalogEntry
from deploykit.models.config import ModelConfig, parse_config, read_model_config
from deploykit.models.fit import (
    CPU_RUNTIME_OVERHEAD,
    Fit,
    cpu_dtype,
    fit_on,
    gpu_usable_bytes,
    kv_bytes_per_token,
    tensor_parallel_sizes,
    weight_bytes,
)
from deploykit.models.hub import HubCard
from deploykit.models.resolve import resolve
from deploykit.models.store import LocalModel, ModelStore
from deploykit.serve.hardware import Hardware
from deploykit.serve.plan import MIN_CONTEXT, gpu_batching, gpu_dtype

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class DtypeMemory:
    dtype: str
    weight_bytes: int
    kv_bytes_per_token: int


@dataclass(frozen=True)
class FitRow:
    target: str  # "2 x NVIDIA L4 (tensor parallel)" or "CPU RAM"
    fit: Fit

    def to_json(self, seq_len: int) -> dict[str, object]:
        return {
            "target": self.target,
            "fits": self.fit.fits,
            "dtype": self.fit.dtype,
            "weight_bytes_per_device": self.fit.weight_bytes_per_device,
            "kv_cache_tokens": self.fit.kv_cache_tokens,
            "max_context": self.fit.max_context,
            "concurrent_sequences": self.fit.concurrent_sequences(seq_len),
        }


@dataclass(frozen=True)
class ModelCard:
    name: str
    entry: CatalogEntry | None
    local: LocalModel | None
    hub: HubCard | None  # None for a service, or when the hub is unreachable and nothing is cached
    config: ModelConfig | None  # None for a service
    memory: tuple[DtypeMemory, ...]
    fits: tuple[FitRow, ...]
    seq_len: int

    def to_json(self) -> dict[str, object]:
        hub = self.hub
        return {
            "name": self.name,
            "catalog": self.entry.model_dump() if self.entry else None,
            "local": self.local.to_json() if self.local else None,
            "hub": {
                "repo": hub.repo,
                "revision": hub.revision,
                "from_cache": hub.from_cache,
                "readme": hub.readme,
                "files": [f.__dict__ for f in hub.files],
            }
            if hub
            else None,
            "memory": [m.__dict__ for m in self.memory],
            "fit": [row.to_json(self.seq_len) for row in self.fits],
            "seq_len": self.seq_len,
        }


def fit_rows(config: ModelConfig, hardware: Hardware) -> list[FitRow]:
    """How the model sits on each GPU count this machine offers (tensor parallel), or in its RAM."""
    if hardware.has_gpu:
        smallest = min(hardware.gpus, key=lambda g: g.memory_bytes)
        dtype = gpu_dtype(hardware.gpus)
        sizes = tensor_parallel_sizes(config, len(hardware.gpus))
        return [
            FitRow(
                f"{n} x {smallest.name}" + (" (tensor parallel)" if n > 1 else ""),
                fit_on(config, dtype, n, gpu_usable_bytes(smallest.memory_bytes), MIN_CONTEXT, gpu_batching(smallest)),
            )
            for n in sizes
        ]
    dtype = cpu_dtype(config)
    budget = hardware.ram_available_bytes - CPU_RUNTIME_OVERHEAD
    return [FitRow("CPU RAM", fit_on(config, dtype, 1, budget, MIN_CONTEXT))]


def fits_here(config: ModelConfig, hardware: Hardware) -> bool:
    return any(row.fit.fits for row in fit_rows(config, hardware))


HubReader = Callable[[str, str], HubCard | None]  # (repo, revision) -> card


def show_model(
    store: ModelStore,
    catalog: Catalog,
    name: str,
    hardware: Hardware,
    seq_len: int = 2048,
    read_hub: HubReader | None = None,
) -> ModelCard:
    """The card for a local model, a catalog entry or any hub repo id. The sizing config comes from the
    local copy's config.json, else the catalog's numbers, else the hub's config.json."""
    model = resolve(name, store, catalog)
    local, entry = model.local, model.entry
    hub = read_hub(model.repo, model.revision) if read_hub and model.repo else None
    if local is None and entry is None and hub is None:
        raise UnknownModelError(name, [*store.aliases(), *catalog.aliases()])
    config: ModelConfig | None = None
    if local is not None:
        config = read_model_config(local.path)
    elif entry is not None and entry.servable:
        config = entry.config()
    elif hub is not None and hub.config is not None:
        weights = sum(f.size for f in hub.files if f.path.endswith(".safetensors"))
        config = parse_config(hub.config, params=weights // 2 if weights else None)  # bf16 on the hub
    memory = (
        tuple(DtypeMemory(d, weight_bytes(config, d), kv_bytes_per_token(config, d)) for d in DTYPES) if config else ()
    )
    fits = tuple(fit_rows(config, hardware)) if config else ()
    return ModelCard(name, entry, local, hub, config, memory, fits, seq_len)
