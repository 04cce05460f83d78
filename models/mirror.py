"""A site mirror of the hub: the models one machine holds, served to a fleet in the hub's own protocol.

    deploykit serve-hub --host 0.0.0.0 --port 8090                    # on the machine that holds them
    HF_ENDPOINT=http://mirror:8090 deploykit pull MODEL --locked       # on every other machine

Each stored model that came from the hub (pulled, or imported from a bundle) is served as its repo at the
commit it holds: that commit, `main` and the revision its lock entry names resolve to it, and nothing
else does (a pull that asks for another commit gets the hub's "revision not found"). Every file is
served with its size and sha256 (from the lock when it lists that commit, else hashed at start-up), as
the hub serves weights, so a pull verifies every byte; Range requests let interrupted pulls resume.
Read-only, with no accounts: for a site's own network.

The routes are the ones huggingface_hub reads (tests/integration/test_mirror.py drives it against them):
    GET      /api/models/{repo}[/revision/{rev}]       repo info: sha, siblings with sizes and sha256
    GET      /api/models/{repo}/tree/{rev}[/{path}]    file listing
    HEAD/GET /{repo}/resolve/{rev}/{path}              X-Repo-Commit, X-Linked-Etag (sha256), the bytes
"""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response

from deploykit.core.errors import UsageError
from deploykit.core.ports import bind
from deploykit.models.lock import Lock, LockEntry, entry_for
from deploykit.models.store import LocalModel, ModelStore

_HUB_SOURCE = "hf://"


@dataclass(frozen=True)
class MirrorFile:
    path: str
    disk: Path
    size: int
    sha256: str

    @property
    def pointer_oid(self) -> str:
        """The git oid of this file's LFS pointer: what the hub lists as the oid of a file kept in LFS."""
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()
        return hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()


@dataclass(frozen=True)
class MirrorRepo:
    repo: str
    commit: str
    alias: str
    names: frozenset[str]  # revisions that resolve to `commit`
    files: dict[str, MirrorFile]


def hub_identity(model: LocalModel) -> tuple[str, str] | None:
    """(repo, commit) for a model that came from the hub at a known commit; None for a local import."""
    if model.format not in ("hub", "bundle") or not model.source.startswith(_HUB_SOURCE):
        return None
    repo, _, commit = model.source.removeprefix(_HUB_SOURCE).rpartition("@")
    return (repo, commit) if repo and commit == model.fingerprint else None


def mirror_repos(
    store: ModelStore, lock: Lock, progress: Callable[[str], None] = lambda _m: None
) -> dict[str, MirrorRepo]:
    """What a mirror of `store` serves, by repo id. A repo held under two aliases is served at the commit
    added last."""
    repos: dict[str, MirrorRepo] = {}
    for model in sorted(store.models(), key=lambda m: m.added_at):
        identity = hub_identity(model)
        if identity is None:
            continue
        repo, commit = identity
        entry = lock.entries.get(model.alias)
        if entry is None or entry.commit != commit:
            progress(f"hashing {model.alias} ({model.size_bytes / 1024**2:.0f} MiB): the lock does not list it")
            entry = entry_for(model, repo=repo, commit=commit)
        repos[repo] = _repo(model, repo, commit, entry)
    return repos


def _repo(model: LocalModel, repo: str, commit: str, entry: LockEntry) -> MirrorRepo:
    files = {}
    for locked in entry.files:
        disk = model.path / locked.path
        if disk.is_file() and disk.stat().st_size == locked.size:  # served as locked, or not at all
            files[locked.path] = MirrorFile(locked.path, disk, locked.size, locked.sha256)
    names = {commit, "main"} | ({entry.revision} if entry.revision else set())
    return MirrorRepo(repo, commit, model.alias, frozenset(names), files)


def serve_mirror(repos: dict[str, MirrorRepo], host: str, port: int) -> None:
    """Serve `repos` until SIGINT or SIGTERM (the port is bound first: one in use fails at once)."""
    if not repos:
        raise UsageError(
            "No model here came from the hub, so the mirror would serve nothing.",
            "Pull models (`deploykit pull MODEL`) or import bundles (`deploykit models import FILE.tar`) first.",
        )
    listener = bind(host, port)
    # uvicorn stops on SIGINT/SIGTERM, then raises the signal again under the handler it found: a quiet one,
    # so that a stop asked for ends with status 0
    found = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        config = uvicorn.Config(create_mirror(repos), log_level="warning", timeout_graceful_shutdown=10)
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        listener.close()
        for sig, handler in found.items():
            signal.signal(sig, handler)


def create_mirror(repos: dict[str, MirrorRepo]) -> FastAPI:
    app = FastAPI(title="deploykit hub mirror", docs_url=None, redoc_url=None, openapi_url=None)

    @app.api_route("/{route:path}", methods=["GET", "HEAD"])
    async def route(route: str) -> Response:
        parts = route.strip("/").split("/")  # already percent-decoded
        if parts[:2] == ["api", "models"]:
            return _api(repos, parts[2:])
        if "resolve" in parts[1:3]:
            at = parts.index("resolve", 1)
            repo = _find(repos, "/".join(parts[:at]))
            if isinstance(repo, Response):
                return repo
            rest = parts[at + 1 :]
            if len(rest) < 2:
                return _error(404, "EntryNotFound", "No file named.")
            wrong = _revision(repo, rest[0])
            return wrong or _file(repo, "/".join(rest[1:]))
        return _error(404, "EntryNotFound", f"/{route} is not a hub route this mirror serves.")

    return app


def _api(repos: dict[str, MirrorRepo], parts: list[str]) -> Response:
    """/api/models/{repo}[/revision/{rev} | /tree/{rev}[/{path}]], for repo ids of one or two segments."""
    for split in (2, 1):
        repo = repos.get("/".join(parts[:split]))
        if repo is None:
            continue
        rest = parts[split:]
        if not rest or rest[0] == "revision":
            wrong = _revision(repo, rest[1] if len(rest) > 1 else "main")
            return wrong or JSONResponse(_info(repo))
        if rest[0] == "tree" and len(rest) > 1:
            wrong = _revision(repo, rest[1])
            prefix = "/".join(rest[2:])
            return wrong or JSONResponse([_tree_entry(f) for f in repo.files.values() if f.path.startswith(prefix)])
        return _error(404, "EntryNotFound", "This mirror serves repo info, trees and files only.")
    return _no_repo("/".join(parts[:2]))


def _find(repos: dict[str, MirrorRepo], repo_id: str) -> MirrorRepo | Response:
    return repos.get(repo_id) or _no_repo(repo_id)


def _no_repo(repo_id: str) -> Response:
    """The hub's answer for a repo it does not have (or may not show)."""
    return _error(401, "RepoNotFound", f"Repository {repo_id} is not on this mirror.")


def _revision(repo: MirrorRepo, revision: str) -> Response | None:
    if revision in repo.names:
        return None
    return _error(404, "RevisionNotFound", f"Invalid rev id: {revision} (this mirror holds {repo.commit}).")


def _file(repo: MirrorRepo, path: str) -> Response:
    f = repo.files.get(path)
    if f is None:
        return _error(404, "EntryNotFound", f"{path} does not exist in {repo.repo}@{repo.commit}.")
    headers = {
        "X-Repo-Commit": repo.commit,
        "ETag": f'"{f.sha256}"',
        "X-Linked-Etag": f'"{f.sha256}"',
        "X-Linked-Size": str(f.size),
    }
    return FileResponse(f.disk, headers=headers, media_type="application/octet-stream")


def _tree_entry(f: MirrorFile) -> dict[str, object]:
    lfs = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
    return {"type": "file", "path": f.path, "size": f.size, "oid": f.pointer_oid, "lfs": lfs}


def _info(repo: MirrorRepo) -> dict[str, object]:
    siblings = [
        {
            "rfilename": f.path,
            "size": f.size,
            "blobId": f.pointer_oid,
            "lfs": {"sha256": f.sha256, "size": f.size, "pointerSize": 134},
        }
        for f in repo.files.values()
    ]
    return {"id": repo.repo, "sha": repo.commit, "private": False, "gated": False, "siblings": siblings}


def _error(status: int, code: str, message: str) -> Response:
    """An error as the hub sends it: huggingface_hub reads the code from X-Error-Code."""
    headers = {"X-Error-Code": code, "X-Error-Message": message}
    return JSONResponse({"error": message}, status_code=status, headers=headers)
