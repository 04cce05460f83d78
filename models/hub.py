"""The Hugging Face hub, through huggingface_hub only: resolve a model, choose the files serving needs,
check the disk, download into the standard HF cache (HF_HOME honoured, resumable), and verify every
file against the hub's sizes and LFS sha256 before the model counts as present.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2  # huggingface_hub 2's HTTP client: its transport errors reach us unwrapped
import huggingface_hub as hf
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors

# Not in huggingface_hub's documented API: the resumable download below needs its cache layout
# (repo_folder_name) and its ranged GET (http_get). pyproject.toml pins huggingface-hub to a minor version
# for that reason; tests/integration/test_hub.py exercises both against a local hub server.
from huggingface_hub.file_download import hf_hub_url, http_get, repo_folder_name
from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]  # a lazy export

from deploykit.core.errors import (
    CorruptDownloadError,
    GatedModelError,
    HubUnreachableError,
    LockError,
    NotEnoughDiskError,
    NotFoundError,
)
from deploykit.models.catalog import Catalog
from deploykit.models.lock import Lock, LockedFile, LockEntry, check_model, entry_for, sha256_file
from deploykit.models.resolve import check_repo_id, resolve
from deploykit.models.store import LocalModel, ModelStore

# Small files an engine reads besides the weights (config, tokenizer, chat template, pooling config).
_SERVING_FILES = ("*.json", "*.jinja", "tokenizer.model", "*.tiktoken", "vocab.txt", "merges.txt", "README.md")
# Weight formats by preference: one is downloaded, never duplicates in another format.
_WEIGHT_FORMATS = ("*.safetensors", "*.bin", "*.pt")
_WEIGHT_SUFFIXES = tuple(p.lstrip("*") for p in _WEIGHT_FORMATS)
# Folders of other runtimes' copies of the model.
_OTHER_RUNTIMES = ("onnx/", "openvino/", "coreml/", "tf/", "flax/", "gguf/")
# Free space left over after a download, so the disk is never filled to the last byte.
DISK_MARGIN = 512 * 1024**2


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # LFS files; small git files have none


@dataclass(frozen=True)
class RemoteModel:
    repo: str
    revision: str  # the commit sha the name resolved to
    files: tuple[RemoteFile, ...]


def remote_model(repo: str, revision: str, *, token: str | None, endpoint: str | None) -> RemoteModel:
    check_repo_id(repo)
    with hub_errors(repo):
        info = hf.HfApi(endpoint=endpoint, token=token).model_info(repo, revision=revision, files_metadata=True)
    files = tuple(RemoteFile(s.rfilename, s.size or 0, s.lfs.sha256 if s.lfs else None) for s in info.siblings or [])
    assert info.sha is not None
    return RemoteModel(repo, info.sha, files)


# Small files `models show` reads from the hub, kept in the HF cache so the card shows offline too.
_CARD_FILES = ("README.md", "config.json")


@dataclass(frozen=True)
class HubCard:
    """What the hub says about a repo: its README model card, config and files, live or from the last look."""

    repo: str
    revision: str
    readme: str | None
    config: dict[str, object] | None
    files: tuple[RemoteFile, ...]
    from_cache: bool


def read_card(
    repo: str,
    revision: str,
    *,
    listings: Path,
    token: str | None = None,
    offline: bool = False,
    endpoint: str | None = None,
    cache_dir: Path | None = None,
) -> HubCard | None:
    """The hub's card for `repo`, cached (small files in the HF cache, the file listing under `listings`) so
    that it shows offline; None when the hub cannot be reached and nothing is cached."""
    listing = listings / (repo.replace("/", "--") + ".json")
    texts: dict[str, str | None] = {}
    if not offline:
        try:
            remote = remote_model(repo, revision, token=token, endpoint=endpoint)
            names = {f.path for f in remote.files}
            with hub_errors(repo):
                for name in _CARD_FILES:
                    path = None
                    if name in names:
                        path = hf.hf_hub_download(
                            repo, name, revision=remote.revision, token=token, endpoint=endpoint, cache_dir=cache_dir
                        )
                    texts[name] = _read(path)
            listings.mkdir(parents=True, exist_ok=True)
            listing.write_text(json.dumps({"revision": remote.revision, "files": [f.__dict__ for f in remote.files]}))
            return _card(repo, remote.revision, texts, remote.files, from_cache=False)
        except (HubUnreachableError, GatedModelError):
            pass  # show what was cached, if anything
    if not listing.exists():
        return None
    record = json.loads(listing.read_text())
    for name in _CARD_FILES:
        path = hf.try_to_load_from_cache(repo, name, cache_dir=cache_dir, revision=record["revision"])
        texts[name] = _read(path if isinstance(path, str) else None)
    files = tuple(RemoteFile(**f) for f in record["files"])
    return _card(repo, record["revision"], texts, files, from_cache=True)


def _card(
    repo: str, revision: str, texts: dict[str, str | None], files: tuple[RemoteFile, ...], from_cache: bool
) -> HubCard:
    config = texts.get("config.json")
    return HubCard(repo, revision, texts.get("README.md"), json.loads(config) if config else None, files, from_cache)


def _read(path: str | None) -> str | None:
    return Path(path).read_text(errors="replace") if path else None


def serving_files(files: tuple[RemoteFile, ...]) -> list[RemoteFile]:
    """What the engine needs: config, tokenizer, chat template, and the weights in one format."""
    usable = [f for f in files if not f.path.startswith(_OTHER_RUNTIMES)]
    small = [f for f in usable if any(fnmatch.fnmatch(f.path.split("/")[-1], p) for p in _SERVING_FILES)]
    for pattern in _WEIGHT_FORMATS:
        weights = [f for f in usable if "/" not in f.path and fnmatch.fnmatch(f.path, pattern)]
        if weights:
            return small + weights
    return small


def pull(
    name: str,
    *,
    store: ModelStore,
    catalog: Catalog,
    token: str | None = None,
    offline: bool = False,
    endpoint: str | None = None,
    cache_dir: Path | None = None,
    disk_free: Callable[[Path], int] = lambda p: shutil.disk_usage(p).free,
    progress: Callable[[str], None] = lambda _m: None,
    lock: Lock | None = None,
    locked: bool = False,
) -> LocalModel:
    """Download a model for serving and record it in the store; an already verified model is reused.

    With a `lock`, the pull records what it resolved there (the commit, each file's size and sha256);
    `locked` instead refuses anything the lock does not list: another commit, another file, other bytes.
    """
    model = resolve(name, store, catalog)
    alias, repo, revision = model.alias, model.hub_repo(), model.revision
    entry = lock.get(alias) if locked and lock is not None else None
    cache = Path(cache_dir or hf_constants.HF_HUB_CACHE)
    existing = store.find(alias)
    verified = existing is not None and existing.format == "hub" and existing.path.is_dir()
    if existing is not None and verified and (offline or revision == existing.fingerprint):
        if entry is not None:
            progress("checking the files against the lock")
            check_model(existing, entry)
        elif lock is not None and alias not in lock.entries:
            lock.put(entry_for(existing, repo=repo, revision=revision, commit=existing.fingerprint))
        return existing  # verified when it was pulled; a commit does not change
    if offline:
        raise NotFoundError(
            f"{repo} is not in the local cache.", "Pull it once with the hub reachable (without --offline)."
        )
    progress(f"asking the hub about {repo}@{revision}")
    remote = remote_model(repo, revision, token=token, endpoint=endpoint)
    files = serving_files(remote.files)
    if entry is not None:
        _check_remote(remote, files, entry)
    if not any(f.path.endswith(_WEIGHT_SUFFIXES) for f in files):
        raise NotFoundError(f"{repo} has no weights deploykit can serve (safetensors, .bin or .pt).")
    missing = sum(f.size for f in files if not _cached(cache, repo, remote.revision, f))
    cache.mkdir(parents=True, exist_ok=True)
    free = disk_free(cache)
    if missing + DISK_MARGIN > free:
        raise NotEnoughDiskError(
            f"{repo} needs {_gib(missing)} more in {cache}, which has {_gib(free)} free.",
            "Free some space, or point HF_HOME at a larger disk.",
        )
    progress(f"downloading {len(files)} files ({_gib(missing)})")
    with hub_errors(repo):
        _download_lfs_resumably(cache, repo, remote.revision, files, token=token, endpoint=endpoint)
        snapshot = Path(
            hf.snapshot_download(
                repo,
                revision=remote.revision,
                allow_patterns=[f.path for f in files],
                token=token,
                endpoint=endpoint,
                cache_dir=cache,
            )
        )
    progress("verifying sizes and sha256")
    digests = verify(snapshot, files)
    local = store.link(
        alias, snapshot, source=f"hf://{repo}@{remote.revision}", format="hub", fingerprint=remote.revision
    )
    if entry is not None:
        check_model(local, entry)
    elif lock is not None:
        lock.put(entry_for(local, repo=repo, revision=revision, commit=remote.revision, known=digests))
    return local


def _check_remote(remote: RemoteModel, files: list[RemoteFile], entry: LockEntry) -> None:
    """Before any download: the hub's commit and file list are the locked ones."""
    if entry.commit is None:
        raise LockError(
            f"The lock records {entry.alias} as a local import, not a commit of {remote.repo} on the hub.",
            f"Import the locked files again (`deploykit models import PATH --alias {entry.alias}`), or take the "
            "hub's commit on purpose with `deploykit pull` without --locked (it rewrites the lock).",
        )
    if remote.revision != entry.commit:
        raise LockError(
            f"{remote.repo} is now commit {remote.revision[:12]} on the hub; the lock says {entry.commit[:12]}.",
            f"Get the locked files with `deploykit pull {remote.repo}@{entry.commit} --locked`, or take the new "
            "commit on purpose with `deploykit pull` without --locked (it rewrites the lock).",
        )
    locked = entry.by_path()
    problems = [f"{f.path}: not in the lock" for f in files if f.path not in locked]
    problems += [f"{path}: no longer on the hub" for path in sorted(locked.keys() - {f.path for f in files})]
    problems += [
        f"{f.path}: the hub's sha256 differs from the lock"
        for f in files
        if f.path in locked and f.sha256 is not None and f.sha256 != locked[f.path].sha256
    ]
    if problems:
        raise LockError(
            f"{remote.repo}@{remote.revision[:12]} does not match the lock.",
            "Update the lock on purpose with `deploykit pull` (without --locked).",
            details=problems[:10],
        )


def _download_lfs_resumably(
    cache: Path, repo: str, revision: str, files: list[RemoteFile], *, token: str | None, endpoint: str | None
) -> None:
    """Fetch the LFS files (the weights) straight into the cache's blobs/ through partial files that survive
    an interruption: the next pull continues each with a Range request. (huggingface_hub itself restarts
    a file from its first byte in a new process.) snapshot_download then finds the blobs in place."""
    blobs = _blobs(cache, repo)
    blobs.mkdir(parents=True, exist_ok=True)
    headers = build_hf_headers(token=token)
    for f in files:
        if f.sha256 is None or (blobs / f.sha256).exists():
            continue  # the LFS sha256 is the blob's name in the cache, as huggingface_hub names it
        partial = blobs / f"{f.sha256}.partial"
        partial.touch()
        with partial.open("r+b") as out:
            out.seek(0, os.SEEK_END)
            url = hf_hub_url(repo, f.path, revision=revision, endpoint=endpoint)
            http_get(url, out, resume_size=out.tell(), headers=headers, expected_size=f.size, displayed_filename=f.path)
        partial.replace(blobs / f.sha256)


def verify(snapshot: Path, files: list[RemoteFile]) -> dict[str, str]:
    """Each file has the hub's size and, for LFS files, its sha256; a bad copy is deleted. Returns each
    file's sha256 (for the lock)."""
    digests = {}
    for f in files:
        local = snapshot / f.path
        size = local.stat().st_size if local.exists() else -1
        bad = size != f.size
        if not bad:
            digests[f.path] = sha256_file(local)
            bad = f.sha256 is not None and digests[f.path] != f.sha256
        if bad:
            blob = local.resolve()
            local.unlink(missing_ok=True)
            blob.unlink(missing_ok=True)
            what = "sha256" if size == f.size else "size"
            raise CorruptDownloadError(
                f"{f.path} does not match the hub's {what}; the bad copy was deleted.",
                "Run the pull again; if it fails again, the hub or a proxy is serving a damaged file.",
            )
    return digests


def delete_model(store: ModelStore, alias: str, cache_dir: Path | None = None) -> int:
    """Remove a model from the store; a pulled one also leaves the HF cache, with the blobs only it used.
    Returns the bytes freed."""
    model = store.get(alias)
    freed = store.remove(alias)
    if model.format == "hub":  # the entry held only a manifest; the bytes are in the cache
        strategy = hf.scan_cache_dir(cache_dir).delete_revisions(model.fingerprint)
        freed = strategy.expected_freed_size
        strategy.execute()
    return freed


@contextlib.contextmanager
def hub_errors(repo: str) -> Iterator[None]:
    """Turn huggingface_hub's errors into ones that say what to do."""
    try:
        yield
    except hf_errors.GatedRepoError as e:
        raise GatedModelError(
            f"{repo} is gated: its licence must be accepted before download.",
            f"Accept it on https://huggingface.co/{repo} while logged in, then set HF_TOKEN "
            "(or pass --token) to a token of that account.",
        ) from e
    except hf_errors.RevisionNotFoundError as e:
        raise NotFoundError(f"{repo} has no such revision.", "Use a branch, tag or commit of the repo.") from e
    except hf_errors.RepositoryNotFoundError as e:
        raise NotFoundError(
            f"{repo} does not exist on the hub (or is private).",
            "Check the repo id; `deploykit models search` lists the catalog.",
        ) from e
    except (hf_errors.OfflineModeIsEnabled, hf_errors.LocalEntryNotFoundError, httpx2.TransportError, OSError) as e:
        raise HubUnreachableError(
            f"The hub cannot be reached for {repo}: {e}",
            "Check the network or HF_ENDPOINT; --offline uses only what is cached.",
        ) from e
    except hf_errors.HfHubHTTPError as e:
        raise HubUnreachableError(f"The hub answered an error for {repo}: {e}") from e


def _cached(cache: Path, repo: str, revision: str, f: RemoteFile) -> bool:
    """Whether the cache holds `f` as the commit `revision` has it. An LFS file (the weights) is its blob,
    named by its sha256, whichever commit fetched it: a new commit that changed only the config needs no
    room for the weights again (nor fetches them: see _download_lfs_resumably)."""
    if f.sha256 is not None:
        path: Path | None = _blobs(cache, repo) / f.sha256
    else:
        found = hf.try_to_load_from_cache(repo, f.path, cache_dir=cache, revision=revision)
        path = Path(found) if isinstance(found, str) else None
    return path is not None and path.is_file() and path.stat().st_size == f.size


def _blobs(cache: Path, repo: str) -> Path:
    return cache / repo_folder_name(repo_id=repo, repo_type="model") / "blobs"


def _gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"


def lock_model(
    name: str,
    *,
    store: ModelStore,
    catalog: Catalog,
    lock: Lock,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: Path | None = None,
) -> LockEntry:
    """Lock what `serve NAME` would serve: the stored copy if there is one (its files hashed here), else what
    the hub resolves NAME to now, without downloading the weights (the hub lists their sha256; the small
    files, config and tokenizer, are fetched into the HF cache to hash them)."""
    model = resolve(name, store, catalog)
    if model.local is not None:
        local = model.local
        commit = local.fingerprint if local.format == "hub" else None
        repo = model.repo if commit is not None else None
        entry = entry_for(local, repo=repo, revision=model.revision if repo else None, commit=commit)
    else:
        repo = model.hub_repo()
        remote = remote_model(repo, model.revision, token=token, endpoint=endpoint)
        locked = []
        for f in serving_files(remote.files):
            digest = f.sha256
            if digest is None:
                with hub_errors(repo):
                    path = hf.hf_hub_download(
                        repo, f.path, revision=remote.revision, token=token, endpoint=endpoint, cache_dir=cache_dir
                    )
                digest = sha256_file(Path(path))
            locked.append(LockedFile(f.path, f.size, digest))
        entry = LockEntry(
            model.alias,
            f"hf://{repo}@{remote.revision}",
            tuple(sorted(locked, key=lambda f: f.path)),
            repo,
            model.revision,
            remote.revision,
        )
    lock.put(entry)
    return entry
