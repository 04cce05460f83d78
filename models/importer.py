"""`deploykit models import`: bring a GGUF file or a Hugging Face model directory into the store."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

from deploykit.core.errors import ModelImportError
from deploykit.models.config import read_model_config
from deploykit.models.gguf import convert_gguf
from deploykit.models.store import LocalModel, ModelStore, check_alias

# Files a model directory may carry that serving never reads.
_SKIP = {".git", ".gitattributes", ".cache", "__pycache__"}
_WEIGHTS = ("*.safetensors", "*.bin", "*.pt")

Progress = Callable[[str], None]


def import_model(
    source: Path,
    alias: str,
    store: ModelStore,
    *,
    force: bool = False,
    progress: Progress = lambda _msg: None,
) -> tuple[LocalModel, bool]:
    """Import `source` under `alias`; returns the model and whether anything was written.

    Importing the same source under the same alias again is a no-op, so set-up scripts can repeat it.
    """
    check_alias(alias)
    try:
        source = source.expanduser().resolve()
        exists = source.exists()
    except (OSError, RuntimeError) as e:  # a name too long, a symlink loop
        raise ModelImportError(
            f"Cannot read {str(source)[:200]}: {e}.", "Pass a .gguf file or a model directory."
        ) from e
    if not exists:
        raise ModelImportError(f"{source} does not exist.", "Pass a .gguf file or a model directory.")
    if source.is_dir():
        kind, build = "hf-dir", _copy_dir(source)
    elif source.suffix == ".gguf":
        kind, build = "gguf", lambda out: convert_gguf(source, out, progress)
    else:
        raise ModelImportError(
            f"{source.name} is neither a .gguf file nor a model directory.",
            "Pass a .gguf file, or a directory with config.json and weights.",
        )
    progress("fingerprinting the source")
    fingerprint = _fingerprint(source)
    existing = store.find(alias)
    if existing is not None and existing.fingerprint == fingerprint and not force:
        return existing, False
    model = store.add(alias, source=str(source), format=kind, fingerprint=fingerprint, build=build, replace=force)
    read_model_config(model.path)  # refuse to list what the engine could not load
    return model, True


def _copy_dir(source: Path) -> Callable[[Path], None]:
    read_model_config(source)
    if not any(any(source.glob(p)) for p in _WEIGHTS):
        raise ModelImportError(
            f"{source} has config.json but no weights (*.safetensors, *.bin).",
            "Copy the whole model directory, weights included.",
        )

    def build(out: Path) -> None:
        for item in source.iterdir():
            if item.name in _SKIP:
                continue
            if item.is_dir():
                shutil.copytree(item, out / item.name)
            else:
                shutil.copy2(item, out / item.name)

    return build


def _fingerprint(source: Path) -> str:
    """sha256 over the source's bytes (a GGUF file) or its files' names, sizes and times (a directory)."""
    digest = hashlib.sha256()
    if source.is_file():
        with source.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    else:
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(source)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
