"""deploykit.lock and bundles: pulls against the local hub server write the lock, --locked refuses a moved
upstream or changed bytes, and models travel to a machine without the hub in a tar checked file by file."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploykit.core.errors import GatedModelError, LockError, ModelImportError
from deploykit.models.bundle import MANIFEST, export_bundle, import_bundle
from deploykit.models.catalog import load_catalog
from deploykit.models.hub import lock_model, pull
from deploykit.models.lock import Lock, LockedFile, check_models
from deploykit.models.store import ModelStore
from tests.fakes.hub import FakeHub, minilm_snapshot, serve_hub
from tests.integration.test_hub import MINILM, cli_env, move_upstream

CATALOG = load_catalog()
ALIAS = "all-minilm-l6-v2"


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    hub = FakeHub()
    hub.add_repo(MINILM, minilm_snapshot())
    server = serve_hub(hub)
    yield hub
    server.shutdown()


def do_pull(hub: FakeHub, tmp_path: Path, name: str = ALIAS, **kw: object):  # type: ignore[no-untyped-def]
    store = ModelStore(tmp_path / "store")
    return pull(name, store=store, catalog=CATALOG, endpoint=hub.url, cache_dir=tmp_path / "hf", **kw)  # type: ignore[arg-type]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pull_locks_the_commit_and_the_sha256_of_every_file_served(hub: FakeHub, tmp_path: Path) -> None:
    lock = Lock(tmp_path / "deploykit.lock")
    model = do_pull(hub, tmp_path, lock=lock)
    entry = Lock.read(lock.path).get(ALIAS)  # as written to disk
    assert entry.repo == MINILM and entry.revision == "main" and entry.commit == hub.repos[MINILM].sha
    served = {p.relative_to(model.path).as_posix(): p for p in model.path.rglob("*") if p.is_file()}
    assert {f.path for f in entry.files} == served.keys()
    for f in entry.files:  # hashed here from the served bytes, not copied from the hub's listing
        assert f.sha256 == sha256(minilm_snapshot() / f.path) and f.size == served[f.path].stat().st_size
    check_models([model], Lock.read(lock.path))


def test_a_stored_model_pulled_again_with_a_lock_is_entered_and_a_locked_pull_checks_it(
    hub: FakeHub, tmp_path: Path
) -> None:
    model = do_pull(hub, tmp_path)  # no lock yet
    lock = Lock(tmp_path / "deploykit.lock")
    served = sum(hub.served.values())
    assert do_pull(hub, tmp_path, ALIAS, lock=lock, offline=True) == model  # nothing fetched: hashed as stored
    entry = Lock.read(lock.path).get(ALIAS)
    assert (entry.repo, entry.revision, entry.commit) == (MINILM, "main", model.fingerprint)
    said: list[str] = []
    assert do_pull(hub, tmp_path, lock=lock, locked=True, offline=True, progress=said.append) == model
    assert said == ["checking the files against the lock"] and sum(hub.served.values()) == served


def test_locked_pull_refuses_a_moved_upstream_before_downloading(hub: FakeHub, tmp_path: Path) -> None:
    lock = Lock(tmp_path / "deploykit.lock")
    locked_commit = do_pull(hub, tmp_path / "a", lock=lock).fingerprint
    new_commit = move_upstream(hub, tmp_path)
    served = sum(hub.served.values())
    with pytest.raises(LockError) as e:
        do_pull(hub, tmp_path / "b", lock=lock, locked=True)
    assert e.value.message == (
        f"{MINILM} is now commit {new_commit[:12]} on the hub; the lock says {locked_commit[:12]}."
    )
    assert e.value.hint == (
        f"Get the locked files with `deploykit pull {MINILM}@{locked_commit} --locked`, or take the new commit on "
        "purpose with `deploykit pull` without --locked (it rewrites the lock)."
    )
    assert sum(hub.served.values()) == served  # nothing fetched
    assert Lock.read(lock.path).get(ALIAS).commit == locked_commit  # --locked never rewrites the lock
    assert do_pull(hub, tmp_path / "c", lock=lock).fingerprint == new_commit  # without it: taken on purpose
    assert Lock.read(lock.path).get(ALIAS).commit == new_commit


def test_locked_pull_lists_each_file_the_hub_has_otherwise_before_downloading(hub: FakeHub, tmp_path: Path) -> None:
    """The hub is at the locked commit, but the lock (edited, or written for other files) disagrees with its
    listing: every difference is named, and nothing is fetched."""
    lock = Lock(tmp_path / "deploykit.lock")
    entry = lock_model(ALIAS, store=ModelStore(tmp_path / "s"), catalog=CATALOG, lock=lock, endpoint=hub.url,
                       cache_dir=tmp_path / "hf0")  # fmt: skip
    served = sum(hub.served.values())  # the small files, hashed for the lock
    files = {f.path: f for f in entry.files}
    weights = files.pop("model.safetensors")
    del files["vocab.txt"]  # on the hub, not in the lock
    files["extra.bin"] = LockedFile("extra.bin", 1, "0" * 64)  # in the lock, not on the hub
    files["model.safetensors"] = dataclasses.replace(weights, sha256="f" * 64)  # the hub lists another sha256
    lock.put(dataclasses.replace(entry, files=tuple(files.values())))
    with pytest.raises(LockError) as e:
        do_pull(hub, tmp_path, lock=lock, locked=True)
    assert e.value.message == f"{MINILM}@{entry.commit[:12]} does not match the lock."  # type: ignore[index]
    assert e.value.hint == "Update the lock on purpose with `deploykit pull` (without --locked)."
    assert e.value.details == [
        "vocab.txt: not in the lock",
        "extra.bin: no longer on the hub",
        "model.safetensors: the hub's sha256 differs from the lock",
    ]
    assert sum(hub.served.values()) == served
    # a lock written for a local import has no commit: no commit of the hub's is the one locked
    lock.put(dataclasses.replace(entry, repo=None, revision=None, commit=None))
    with pytest.raises(LockError) as e:
        do_pull(hub, tmp_path, lock=lock, locked=True)
    assert e.value.message == f"The lock records {ALIAS} as a local import, not a commit of {MINILM} on the hub."
    assert e.value.hint == (
        f"Import the locked files again (`deploykit models import PATH --alias {ALIAS}`), or take the hub's "
        "commit on purpose with `deploykit pull` without --locked (it rewrites the lock)."
    )
    assert sum(hub.served.values()) == served


def test_locked_pull_refuses_changed_bytes_and_a_model_not_in_the_lock(hub: FakeHub, tmp_path: Path) -> None:
    lock = Lock(tmp_path / "deploykit.lock")
    with pytest.raises(LockError, match="no entry for all-minilm-l6-v2"):
        do_pull(hub, tmp_path, lock=lock, locked=True)
    model = do_pull(hub, tmp_path, lock=lock)
    assert do_pull(hub, tmp_path, lock=lock, locked=True).path == model.path
    tokenizer = model.path / "tokenizer.json"
    tokenizer.unlink()  # a symlink into the cache: write a doctored copy in its place
    tokenizer.write_text("{}")
    with pytest.raises(LockError) as e:
        do_pull(hub, tmp_path, lock=lock, locked=True, offline=True)
    assert e.value.details == [
        f"tokenizer.json: 2 bytes, locked {(minilm_snapshot() / 'tokenizer.json').stat().st_size}"
    ]


def test_models_lock_resolves_without_downloading_the_weights(hub: FakeHub, tmp_path: Path) -> None:
    lock = Lock(tmp_path / "deploykit.lock")
    store = ModelStore(tmp_path / "store")
    entry = lock_model(ALIAS, store=store, catalog=CATALOG, lock=lock, endpoint=hub.url, cache_dir=tmp_path / "hf")
    assert hub.served[(MINILM, "model.safetensors")] == 0 and store.models() == []
    assert entry.commit == hub.repos[MINILM].sha
    assert {f.path: f.sha256 for f in entry.files} == {f.path: sha256(minilm_snapshot() / f.path) for f in entry.files}
    model = do_pull(hub, tmp_path, lock=Lock.read(lock.path), locked=True)  # the lock it wrote is the pull's
    assert Lock.read(lock.path).get(ALIAS) == entry
    check_models([model], Lock.read(lock.path))


def test_models_lock_of_an_older_commit_hashes_that_commits_files(hub: FakeHub, tmp_path: Path) -> None:
    old = hub.repos[MINILM].sha
    move_upstream(hub, tmp_path)
    lock = Lock(tmp_path / "deploykit.lock")
    store = ModelStore(tmp_path / "store")
    name = f"{ALIAS}@{old}"
    entry = lock_model(name, store=store, catalog=CATALOG, lock=lock, endpoint=hub.url, cache_dir=tmp_path / "hf")
    assert (entry.revision, entry.commit, entry.source) == (old, old, f"hf://{MINILM}@{old}")
    assert {f.path: f.sha256 for f in entry.files} == {f.path: sha256(minilm_snapshot() / f.path) for f in entry.files}
    # the locked commit is still on the hub: the hint of a refused --locked pull works
    assert do_pull(hub, tmp_path, name, lock=Lock.read(lock.path), locked=True).fingerprint == old


def test_a_bundle_carries_a_model_to_a_machine_without_the_hub(hub: FakeHub, tmp_path: Path) -> None:
    online_lock = Lock(tmp_path / "online.lock")
    model = do_pull(hub, tmp_path / "online", lock=online_lock)
    bundle = tmp_path / "minilm.tar"
    steps: list[tuple[int, int]] = []
    export_bundle([model], bundle, lock=Lock.read(online_lock.path), progress=lambda d, t: steps.append((d, t)))
    assert not bundle.with_name("minilm.tar.partial").exists()
    entry = online_lock.get(ALIAS)
    assert steps[-1] == (entry.size, entry.size)

    offline = ModelStore(tmp_path / "offline" / "models")
    offline_lock = Lock(tmp_path / "offline" / "deploykit.lock")
    (imported,) = import_bundle(bundle, offline, lock=offline_lock)
    assert imported.alias == ALIAS and imported.format == "bundle" and imported.fingerprint == entry.commit
    for f in entry.files:
        assert (imported.path / f.path).read_bytes() == (model.path / f.path).read_bytes()
    assert Lock.read(offline_lock.path).get(ALIAS) == entry
    check_models([imported], Lock.read(offline_lock.path))  # serve --locked passes
    with pytest.raises(ModelImportError, match="already in the store"):
        import_bundle(bundle, offline, lock=offline_lock)


def rewrite(bundle: Path, out: Path, change) -> Path:  # type: ignore[no-untyped-def]
    """A copy of `bundle` with change(name, data) -> [(name, data), ...] applied to each member."""
    with tarfile.open(bundle) as src, tarfile.open(out, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()  # type: ignore[union-attr]
            for name, new in change(member.name, data):
                info = tarfile.TarInfo(name)
                info.size = len(new)
                dst.addfile(info, io.BytesIO(new))
    return out


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("flipped", "does not match its sha256"),
        ("truncated", "truncated or damaged"),
        ("missing", "ends before"),
        ("extra", "which its manifest does not list"),
        ("escape", "malformed"),
        ("no-manifest", "is not a deploykit bundle"),
    ],
)
def test_a_damaged_or_doctored_bundle_is_rejected_whole(hub: FakeHub, tmp_path: Path, case: str, says: str) -> None:
    model = do_pull(hub, tmp_path / "online")
    bundle = tmp_path / "good.tar"
    export_bundle([model], bundle, lock=Lock(tmp_path / "none.lock"))
    weights = f"models/{ALIAS}/model.safetensors"
    bad = tmp_path / "bad.tar"
    if case == "truncated":
        bad.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
    elif case == "flipped":
        rewrite(bundle, bad, lambda n, d: [(n, d[:-1] + bytes([d[-1] ^ 1]) if n == weights else d)])
    elif case == "missing":
        rewrite(bundle, bad, lambda n, d: [] if n == weights else [(n, d)])
    elif case == "extra":
        rewrite(bundle, bad, lambda n, d: [(n, d), *([("models/../../evil.py", b"x")] if n == weights else [])])
    elif case == "escape":
        to_escape = lambda d: d.replace(b'path = "config.json"', b'path = "../../config.json"')  # noqa: E731
        rewrite(bundle, bad, lambda n, d: [(n, to_escape(d) if n == MANIFEST else d)])
    else:
        rewrite(bundle, bad, lambda n, d: [] if n == MANIFEST else [(n, d)])
    store = ModelStore(tmp_path / "offline" / "models")
    lock = Lock(tmp_path / "offline" / "deploykit.lock")
    with pytest.raises(ModelImportError, match=says):
        import_bundle(bad, store, lock=lock)
    assert store.models() == [] and not lock.path.exists()
    assert not (tmp_path / "evil.py").exists() and not (tmp_path / "offline" / "evil.py").exists()
    assert [p.name for p in store.root.iterdir()] == [] if store.root.exists() else True  # no staging left


def test_air_gapped_workflow_through_the_cli(hub: FakeHub, tmp_path: Path) -> None:
    """The README's four commands, each machine with its own home; the second one has no hub at all."""
    online = cli_env(hub, tmp_path / "online")
    offline = {**cli_env(hub, tmp_path / "offline"), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}
    bundle = tmp_path / "minilm.tar"

    def deploykit(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "deploykit", *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)

    assert deploykit(online, "pull", ALIAS).returncode == 0
    exported = deploykit(online, "models", "export", ALIAS, "--output", str(bundle))
    assert exported.returncode == 0 and "Wrote" in exported.stderr, exported.stderr
    imported = deploykit(offline, "models", "import", str(bundle), "--json")
    assert imported.returncode == 0, imported.stderr
    home = tmp_path / "offline" / "home"
    assert (home / "deploykit.lock").read_text() == (tmp_path / "online" / "home" / "deploykit.lock").read_text()
    # serve --locked on a doctored copy stops before any engine starts, with the lock's exit code
    (home / "models" / ALIAS / "model" / "vocab.txt").write_text("doctored")
    served = deploykit(offline, "serve", ALIAS, "--locked")
    assert served.returncode == 8, served.stderr
    assert "does not match the lock" in served.stderr and "vocab.txt" in served.stderr
    assert "Traceback" not in served.stderr


def test_models_lock_of_a_gated_repo_and_of_stored_copies(tmp_path: Path) -> None:
    """A gated repo needs the token for the listing and the small files, which land in the given cache; a
    stored copy is locked as stored: a pulled one with its repo and commit, an imported one with neither."""
    hub = FakeHub()
    hub.add_repo(MINILM, minilm_snapshot(), gated=True)
    server = serve_hub(hub)
    try:
        lock, store, cache = Lock(tmp_path / "deploykit.lock"), ModelStore(tmp_path / "store"), tmp_path / "hf"
        remote = lock_model(ALIAS, store=store, catalog=CATALOG, lock=lock, endpoint=hub.url, token=hub.token,
                            cache_dir=cache)  # fmt: skip
        sha = hub.repos[MINILM].sha
        assert (remote.alias, remote.source, remote.repo, remote.revision, remote.commit) == (
            ALIAS, f"hf://{MINILM}@{sha}", MINILM, "main", sha,
        )  # fmt: skip
        assert [f.path for f in remote.files] == sorted(f.path for f in remote.files)
        assert (cache / f"models--{MINILM.replace('/', '--')}" / "snapshots" / sha / "config.json").is_file()
        with pytest.raises(GatedModelError):
            lock_model(ALIAS, store=store, catalog=CATALOG, lock=lock, endpoint=hub.url, cache_dir=cache)
        pulled = pull(ALIAS, store=store, catalog=CATALOG, endpoint=hub.url, token=hub.token, cache_dir=cache)
        stored = lock_model(ALIAS, store=store, catalog=CATALOG, lock=lock)  # no hub needed: the stored copy
        assert stored == remote and Lock.read(lock.path).get(ALIAS) == stored
    finally:
        server.shutdown()
    # imported under a catalog model's alias: still a local copy, with no repo (the catalog's is not its source)
    store.add("llama-2-7b", source=str(pulled.path), format="safetensors", fingerprint="f1",
              build=lambda d: shutil.copytree(pulled.path, d, dirs_exist_ok=True))  # fmt: skip
    imported = lock_model("llama-2-7b", store=store, catalog=CATALOG, lock=lock)
    assert (imported.repo, imported.revision, imported.commit) == (None, None, None)
    assert imported.source == str(pulled.path) and imported.files == stored.files
