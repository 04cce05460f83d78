"""The local model store: one folder per alias under DEPLOYKIT_HOME/models, written atomically.

models/<alias>/manifest.json   what it is and where it came from
models/<alias>/model/          a standard Hugging Face model directory (what the engine loads)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from deploykit.core.errors import ModelImportError, UnknownModelError, UsageError

_ALIAS = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # used with fullmatch


@dataclass(frozen=True)
class LocalModel:
    alias: str
    path: Path
    source: str
    format: str
    fingerprint: str
    size_bytes: int
    added_at: str

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "path": str(self.path)}


def check_alias(alias: str) -> str:
    """`alias`, or a UsageError: an alias is one plain folder name, never a path (fullmatch: `$` alone would
    let a trailing newline through)."""
    if not _ALIAS.fullmatch(alias):
        raise UsageError(
            f"'{alias}' is not a valid model alias.",
            "Use lower-case letters, digits, '.', '_' and '-' (at most 64), starting with a letter or digit.",
        )
    return alias


class ModelStore:
    """Models that this machine can serve, by alias."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def models(self) -> list[LocalModel]:
        if not self.root.is_dir():
            return []
        found = (self._read(d) for d in sorted(self.root.iterdir()) if (d / "manifest.json").is_file())
        return [m for m in found if m is not None]

    def aliases(self) -> list[str]:
        return [m.alias for m in self.models()]

    def find(self, alias: str) -> LocalModel | None:
        """The model stored under `alias`; None for any name that is not a valid alias (a path, say)."""
        entry = self._entry(alias)
        return self._read(entry) if entry is not None and (entry / "manifest.json").is_file() else None

    def get(self, alias: str) -> LocalModel:
        model = self.find(alias)
        if model is None:
            raise UnknownModelError(alias, self.aliases())
        return model

    def add(
        self,
        alias: str,
        *,
        source: str,
        format: str,
        fingerprint: str,
        build: Callable[[Path], None],
        replace: bool = False,
    ) -> LocalModel:
        """Build a model directory in a staging folder and move it into place only once complete.

        A failure anywhere leaves the store as it was: no half-written model is ever listed.
        """
        check_alias(alias)
        final = self.root / alias
        if final.exists() and not replace:
            raise ModelImportError(
                f"A model named '{alias}' is already in the store.",
                "Choose another --alias, or pass --force to replace it.",
            )
        self._make_root()
        staging = self.root / f".staging-{alias}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            (staging / "model").mkdir(parents=True)
            build(staging / "model")
            manifest = _manifest(alias, source, format, fingerprint, staging / "model")
            (staging / "manifest.json").write_text(manifest)
            if final.exists():
                old = self.root / f".old-{alias}-{os.getpid()}"
                final.rename(old)
                staging.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.get(alias)

    def link(self, alias: str, path: Path, *, source: str, format: str, fingerprint: str) -> LocalModel:
        """Record a model whose files live elsewhere (a snapshot in the HF cache)."""
        check_alias(alias)
        self._make_root()
        entry = self.root / alias
        entry.mkdir(exist_ok=True)
        tmp = entry / "manifest.json.tmp"
        tmp.write_text(_manifest(alias, source, format, fingerprint, path, external=True))
        tmp.replace(entry / "manifest.json")  # atomic: a reader sees the old manifest or the new one
        return self.get(alias)

    def remove(self, alias: str) -> int:
        """Delete a model's entry and the files under it; returns the bytes freed there. Only ever a folder
        directly under the store's root: `get` refuses any name that is not a valid alias."""
        model = self.get(alias)
        entry = self._entry(alias)
        assert entry is not None and entry.parent == self.root
        shutil.rmtree(entry)
        return model.size_bytes

    def _make_root(self) -> None:
        """The store and the home above it are this user's only (the home holds the key database too)."""
        self.root.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root.mkdir(mode=0o700, exist_ok=True)

    def _entry(self, alias: str) -> Path | None:
        """The store folder for `alias`, or None when `alias` is not one (so no path ever leaves the root)."""
        return self.root / alias if _ALIAS.fullmatch(alias) else None

    def _read(self, entry: Path) -> LocalModel | None:
        try:
            raw = json.loads((entry / "manifest.json").read_text())
            return LocalModel(
                alias=raw["alias"],
                path=Path(raw["path"]) if "path" in raw else entry / "model",
                source=raw["source"],
                format=raw["format"],
                fingerprint=raw["fingerprint"],
                size_bytes=int(raw["size_bytes"]),
                added_at=raw["added_at"],
            )
        except (OSError, ValueError, KeyError):
            return None  # a damaged entry is not servable; `models list` simply does not show it


def _manifest(alias: str, source: str, format: str, fingerprint: str, files: Path, external: bool = False) -> str:
    """manifest.json for a model whose files are in `files` (recorded as its path when `external`)."""
    manifest: dict[str, object] = {
        "alias": alias,
        "source": source,
        "format": format,
        "fingerprint": fingerprint,
        "size_bytes": sum(f.stat().st_size for f in files.rglob("*") if f.is_file()),
        "added_at": _now_iso(),
    }
    if external:
        manifest["path"] = str(files)
    return json.dumps(manifest, indent=2) + "\n"


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
