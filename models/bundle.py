"""Bundles: stored models in one tar file, for machines that cannot reach the hub.

    deploykit-bundle.toml        first: the lock entries of the models inside (deploykit.lock's format)
    models/<alias>/<path>        then each locked file, in the entry's order

Export streams each file into the tar (no copy in memory) and writes `OUTPUT.partial`, renamed only when
complete. Import reads the tar as a stream, accepts only regular files the entries list, hashes them on
the way into a staging folder, and moves the models into the store only when every file of every model
matched: a damaged, truncated or doctored bundle is rejected whole and nothing is listed.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from deploykit.core.errors import LockError, ModelImportError, UsageError
from deploykit.models.lock import Lock, LockEntry, check_model, entry_for, parse_entries, render
from deploykit.models.store import LocalModel, ModelStore

MANIFEST = "deploykit-bundle.toml"
_CHUNK = 1 << 20

Progress = Callable[[int, int], None]  # bytes done, bytes in all


@dataclass(frozen=True)
class Exported:
    path: Path
    models: tuple[LockEntry, ...]
    size_bytes: int


def export_bundle(
    models: Sequence[LocalModel], output: Path, *, lock: Lock, progress: Progress = lambda _d, _t: None
) -> Exported:
    """Write `models` to the tar `output`, each with its lock entry: the lock's (the files must match it)
    or, for a model the lock does not list, one made from its files now."""
    if output.exists() and output.is_dir():
        raise UsageError(f"{output} is a directory.", "Name the bundle file, e.g. --output models.tar.")
    entries = []
    for model in models:
        entry = lock.entries.get(model.alias)
        if entry is not None:
            check_model(model, entry)
        else:
            entry = entry_for(model)
        entries.append(entry)
    total = sum(e.size for e in entries)
    done = 0
    partial = output.with_name(output.name + ".partial")
    try:
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            manifest = render(entries).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size = len(manifest)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(manifest))
            for model, entry in zip(models, entries, strict=True):
                for f in entry.files:
                    info = tarfile.TarInfo(f"models/{entry.alias}/{f.path}")
                    info.size, info.mode = f.size, 0o644
                    with (model.path / f.path).open("rb") as fh:

                        def step(n: int) -> None:
                            nonlocal done
                            done += n
                            progress(done, total)

                        tar.addfile(info, _Counting(fh, step))
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)
    return Exported(output, tuple(entries), output.stat().st_size)


def import_bundle(
    bundle: Path,
    store: ModelStore,
    *,
    lock: Lock,
    force: bool = False,
    progress: Progress = lambda _d, _t: None,
) -> list[LocalModel]:
    """Import every model in `bundle` into the store, verified against the bundle's lock entries, and
    record those entries in `lock`. All or nothing."""
    staging = store.root / f".bundle-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with _open(bundle) as tar:
            entries = _read_manifest(tar, bundle)
            for alias in entries:
                if store.find(alias) is not None and not force:
                    raise ModelImportError(
                        f"A model named '{alias}' is already in the store.", "Pass --force to replace it."
                    )
                known = lock.entries.get(alias)
                if known is not None and known != entries[alias] and not force:
                    raise LockError(
                        f"The bundle's {alias} is not the one {lock.path} locks.",
                        "Pass --force to replace the lock entry with the bundle's.",
                    )
            _extract(tar, entries, staging, bundle, progress)
        imported = []
        for alias, entry in entries.items():
            source = staging / alias

            def build(out: Path, source: Path = source) -> None:
                for item in source.iterdir():
                    item.rename(out / item.name)

            fingerprint = entry.commit or _entry_digest(entry)
            imported.append(
                store.add(
                    alias, source=entry.source, format="bundle", fingerprint=fingerprint, build=build, replace=force
                )
            )
        lock.put(*entries.values())
        return imported
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract(
    tar: tarfile.TarFile, entries: dict[str, LockEntry], staging: Path, bundle: Path, progress: Progress
) -> None:
    """Stream the files into staging/<alias>/..., each checked against its entry as it passes."""
    expected = {f"models/{e.alias}/{f.path}": (e.alias, f) for e in entries.values() for f in e.files}
    total, done, seen = sum(e.size for e in entries.values()), 0, set()
    for member in _members(tar, bundle):
        if member.name not in expected or member.name in seen or not member.isfile():
            raise ModelImportError(
                f"{bundle.name} holds {member.name[:200]!r}, which its manifest does not list; nothing was imported.",
                "Use a bundle written by `deploykit models export`.",
            )
        seen.add(member.name)
        alias, locked = expected[member.name]
        target = staging / alias / locked.path
        target.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        reader = tar.extractfile(member)
        assert reader is not None
        with target.open("wb") as out:
            while chunk := _read(reader, bundle):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
                done += len(chunk)
                progress(done, total)
        if size != locked.size or digest.hexdigest() != locked.sha256:
            raise ModelImportError(
                f"{member.name} in {bundle.name} does not match its sha256 in the manifest; nothing was imported.",
                "The bundle is damaged: export it again, or copy it again and compare its checksum.",
            )
    missing = sorted(expected.keys() - seen)
    if missing:
        raise ModelImportError(
            f"{bundle.name} ends before {missing[0]} ({len(missing)} file(s) missing); nothing was imported.",
            "The bundle is incomplete (an interrupted copy?): copy it again.",
        )


def _read_manifest(tar: tarfile.TarFile, bundle: Path) -> dict[str, LockEntry]:
    first = next(_members(tar, bundle), None)
    if first is None or first.name != MANIFEST or not first.isfile() or first.size > 16 * 1024**2:
        raise ModelImportError(
            f"{bundle.name} is not a deploykit bundle (it does not start with {MANIFEST}).",
            "Write bundles with `deploykit models export`.",
        )
    reader = tar.extractfile(first)
    assert reader is not None
    try:
        entries = parse_entries(tomllib.loads(reader.read().decode()))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, LockError) as e:
        raise ModelImportError(f"{bundle.name}'s manifest cannot be read: {e}.") from e
    if not entries:
        raise ModelImportError(f"{bundle.name} holds no models.")
    return entries


def _members(tar: tarfile.TarFile, bundle: Path) -> Iterator[tarfile.TarInfo]:
    while True:
        try:
            member = tar.next()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise _damaged(bundle, e) from e
        if member is None:
            return
        yield member


def _read(reader: IO[bytes], bundle: Path) -> bytes:
    try:
        return reader.read(_CHUNK)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise _damaged(bundle, e) from e


def _damaged(bundle: Path, e: BaseException) -> ModelImportError:
    return ModelImportError(
        f"{bundle.name} is truncated or damaged ({e}); nothing was imported.",
        "Copy the bundle again (an interrupted copy leaves it short), or export it again.",
    )


def _open(bundle: Path) -> tarfile.TarFile:
    if not bundle.is_file():
        raise ModelImportError(f"{bundle} does not exist.", "Pass the .tar file `deploykit models export` wrote.")
    try:
        return tarfile.open(bundle, "r|")  # a stream: members in order, no seeking, no index in memory
    except tarfile.TarError as e:
        raise ModelImportError(f"{bundle.name} is not a tar file ({e}).", "Pass a bundle from `models export`.") from e


def _entry_digest(entry: LockEntry) -> str:
    """A fingerprint for a model with no hub commit: the sha256 over its locked files."""
    digest = hashlib.sha256()
    for f in sorted(entry.files, key=lambda f: f.path):
        digest.update(f"{f.path}\0{f.size}\0{f.sha256}\n".encode())
    return digest.hexdigest()


def is_bundle(path: Path) -> bool:
    return path.is_file() and path.suffix == ".tar"


class _Counting:
    """A file object that reports the bytes read through it (tarfile copies from it in chunks)."""

    def __init__(self, inner: IO[bytes], step: Callable[[int], None]) -> None:
        self.inner, self.step = inner, step

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        self.step(len(data))
        return data
