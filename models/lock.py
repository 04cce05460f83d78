"""deploykit.lock: the exact models a deployment serves, so that every machine serves the same bytes.

The catalog names branches ("main"); a branch moves. The lock records, per model, the commit a pull
resolved and the size and sha256 of every file served. `pull` writes it; `pull --locked` and
`serve --locked` refuse anything that differs; bundles for air-gapped machines carry their entries.

    version = 1

    [models."smollm2-135m"]
    source = "hf://HuggingFaceTB/SmolLM2-135M-Instruct@0123abcd..."
    repo = "HuggingFaceTB/SmolLM2-135M-Instruct"   # hub models only
    revision = "main"                              # what was asked
    commit = "0123abcd..."                         # what it resolved to
    files = [
      { path = "config.json", size = 861, sha256 = "..." },
    ]

Written by hand (the standard library reads TOML but does not write it): every string goes through
json.dumps, whose escapes are TOML's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from deploykit.core.errors import LockError, UsageError
from deploykit.models.store import LocalModel, check_alias

LOCK_NAME = "deploykit.lock"
VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class LockedFile:
    path: str  # relative, '/'-separated
    size: int
    sha256: str


@dataclass(frozen=True)
class LockEntry:
    alias: str
    source: str
    files: tuple[LockedFile, ...]
    repo: str | None = None
    revision: str | None = None
    commit: str | None = None

    def by_path(self) -> dict[str, LockedFile]:
        return {f.path: f for f in self.files}

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def to_toml(self) -> str:
        lines = [f"[models.{json.dumps(self.alias)}]", f"source = {json.dumps(self.source)}"]
        for key in ("repo", "revision", "commit"):
            value = getattr(self, key)
            if value is not None:
                lines.append(f"{key} = {json.dumps(value)}")
        lines.append("files = [")
        for f in sorted(self.files, key=lambda f: f.path):
            lines.append(f"  {{ path = {json.dumps(f.path)}, size = {f.size}, sha256 = {json.dumps(f.sha256)} }},")
        lines.append("]")
        return "\n".join(lines) + "\n"


@dataclass
class Lock:
    """The entries of one lock file, by alias."""

    path: Path
    entries: dict[str, LockEntry] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Lock:
        """The lock at `path`; an empty one when there is no file yet."""
        if not path.exists():
            return cls(path)
        try:
            return cls(path, parse_entries(tomllib.loads(path.read_text())))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise LockError(f"{path} cannot be read: {e}.", "Fix it, or delete it and pull again to write it.") from e

    def get(self, alias: str) -> LockEntry:
        entry = self.entries.get(alias)
        if entry is None:
            raise LockError(
                f"{self.path} has no entry for {alias}.",
                f"Write one with `deploykit pull {alias}` (or `deploykit models lock {alias}`), then commit the lock.",
            )
        return entry

    def put(self, *entries: LockEntry) -> None:
        """Add or replace entries and write the file atomically (a reader sees the old lock or the new)."""
        for entry in entries:
            self.entries[entry.alias] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(render(self.entries.values()))
        tmp.replace(self.path)


def render(entries: Iterable[LockEntry]) -> str:
    head = (
        "# deploykit.lock: the exact files each model serves. Written by `deploykit pull` and\n"
        "# `deploykit models lock`; checked by `pull --locked` and `serve --locked`. Commit it with the deployment.\n"
        f"version = {VERSION}\n"
    )
    return head + "".join("\n" + e.to_toml() for e in sorted(entries, key=lambda e: e.alias))


def parse_entries(data: dict[str, object]) -> dict[str, LockEntry]:
    """Lock entries from parsed TOML, each checked: a lock (or a bundle's) may come from anywhere."""
    if data.get("version") != VERSION:
        raise LockError(f"Lock format version {data.get('version')!r} is not {VERSION}.", "Upgrade deploykit.")
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise LockError("The lock's [models] is not a table.")
    entries = {}
    for alias, raw in models.items():
        try:
            check_alias(alias)
            files = tuple(
                LockedFile(check_path(f["path"]), int(f["size"]), _check_sha256(f["sha256"])) for f in raw["files"]
            )
            entries[alias] = LockEntry(
                alias, str(raw["source"]), files, raw.get("repo"), raw.get("revision"), raw.get("commit")
            )
        except (KeyError, TypeError, ValueError, AttributeError, UsageError) as e:
            raise LockError(f"The lock entry for {alias[:64]!r} is malformed ({e}).") from e
    return entries


def check_path(path: str) -> str:
    """`path` if it is a plain relative file path inside a model directory; ValueError otherwise."""
    pure = PurePosixPath(path)
    if (
        not isinstance(path, str)
        or not path
        or "\\" in path
        or "\0" in path
        or pure.is_absolute()
        or any(part in ("", ".", "..") for part in path.split("/"))
    ):
        raise ValueError(f"not a file path inside a model: {path!r}")
    return path


def _check_sha256(value: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise ValueError(f"not a sha256: {value!r}")
    return value


def entry_for(
    model: LocalModel,
    *,
    repo: str | None = None,
    revision: str | None = None,
    commit: str | None = None,
    known: dict[str, str] | None = None,
    progress: Callable[[int], None] = lambda _n: None,
) -> LockEntry:
    """The lock entry for a stored model: every file under its path, hashed (`known` sha256 by path are
    taken as they are: the pull just computed them)."""
    files = []
    for local in sorted(p for p in model.path.rglob("*") if p.is_file()):
        rel = local.relative_to(model.path).as_posix()
        digest = (known or {}).get(rel) or sha256_file(local, progress)
        files.append(LockedFile(rel, local.stat().st_size, digest))
    return LockEntry(model.alias, model.source, tuple(files), repo, revision, commit)


def check_model(model: LocalModel, entry: LockEntry, progress: Callable[[int], None] = lambda _n: None) -> None:
    """LockError unless `model`'s files are exactly the locked ones, byte for byte (by sha256)."""
    if entry.commit is not None and model.format in ("hub", "bundle") and model.fingerprint != entry.commit:
        raise LockError(
            f"{model.alias} here is commit {model.fingerprint[:12]}, the lock says {entry.commit[:12]}.",
            f"Pull the locked commit: deploykit pull {entry.repo}@{entry.commit} --locked",
        )
    present = {p.relative_to(model.path).as_posix(): p for p in model.path.rglob("*") if p.is_file()}
    locked = entry.by_path()
    problems = [f"{path}: not in the lock" for path in sorted(present.keys() - locked.keys())]
    problems += [f"{path}: missing" for path in sorted(locked.keys() - present.keys())]
    for path in sorted(locked.keys() & present.keys()):
        want, local = locked[path], present[path]
        if local.stat().st_size != want.size:
            problems.append(f"{path}: {local.stat().st_size} bytes, locked {want.size}")
        elif sha256_file(local, progress) != want.sha256:
            problems.append(f"{path}: sha256 differs from the lock")
    if problems:
        raise LockError(
            f"{model.alias} does not match the lock ({len(problems)} file(s)).",
            "Pull it again with --locked, or update the lock on purpose with `deploykit pull` (without --locked).",
            details=problems[:10],
        )


def check_models(models: Iterable[LocalModel], lock: Lock) -> None:
    """check_model for each of `models` against its entry in `lock` (LockError when it has none)."""
    for model in models:
        check_model(model, lock.get(model.alias))


def sha256_file(path: Path, progress: Callable[[int], None] = lambda _n: None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            progress(len(chunk))
    return digest.hexdigest()
