"""`deploykit serve-hub`: one machine's models served to others in the hub's protocol. Checked with
huggingface_hub's own client, and with `deploykit pull --locked` from a machine that never saw the hub."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import huggingface_hub as hf
import pytest
from huggingface_hub import errors as hf_errors

from deploykit.core.ports import free_port
from deploykit.models.bundle import export_bundle, import_bundle
from deploykit.models.catalog import load_catalog
from deploykit.models.hub import pull
from deploykit.models.lock import Lock, check_models
from deploykit.models.mirror import create_mirror, mirror_repos
from deploykit.models.store import LocalModel, ModelStore
from tests.fakes.hub import FakeHub, serve_hub
from tests.fakes.threaded import serve_in_thread
from tests.integration.test_hub import MINILM, minilm_snapshot

CATALOG = load_catalog()
ALIAS = "all-minilm-l6-v2"


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[tuple[Path, LocalModel]]:
    """The mirror machine: a deploykit home that pulled MiniLM from the (local) hub, which then goes away."""
    hub = FakeHub()
    hub.add_repo(MINILM, minilm_snapshot())
    server = serve_hub(hub)
    home = tmp_path / "origin"
    lock = Lock(home / "deploykit.lock")
    model = pull(
        ALIAS, store=ModelStore(home / "models"), catalog=CATALOG, endpoint=hub.url, cache_dir=home / "hf", lock=lock
    )
    server.shutdown()
    yield home, model


def origin_repos(home: Path) -> dict:  # type: ignore[type-arg]
    return mirror_repos(ModelStore(home / "models"), Lock.read(home / "deploykit.lock"))


def test_huggingface_hub_reads_the_mirror_as_it_reads_the_hub(origin: tuple[Path, LocalModel], tmp_path: Path) -> None:
    home, model = origin
    entry = Lock.read(home / "deploykit.lock").get(ALIAS)
    with serve_in_thread(create_mirror(origin_repos(home))) as url:
        api = hf.HfApi(endpoint=url)
        info = api.model_info(MINILM, files_metadata=True)
        assert info.sha == model.fingerprint
        listed = {s.rfilename: (s.size, s.lfs.sha256 if s.lfs else None) for s in info.siblings or []}
        assert listed == {f.path: (f.size, f.sha256) for f in entry.files}  # every file with its sha256
        assert api.model_info(MINILM, revision=model.fingerprint).sha == model.fingerprint
        snapshot = Path(hf.snapshot_download(MINILM, endpoint=url, cache_dir=tmp_path / "client"))
        assert snapshot.name == model.fingerprint
        for f in entry.files:
            assert (snapshot / f.path).read_bytes() == (minilm_snapshot() / f.path).read_bytes()
        with pytest.raises(hf_errors.RevisionNotFoundError):
            api.model_info(MINILM, revision="v2.0")  # only the commit it holds, under its own names
        with pytest.raises(hf_errors.RepositoryNotFoundError):
            api.model_info("meta-llama/Llama-2-7b-hf")

        weights = (minilm_snapshot() / "model.safetensors").read_bytes()
        resolve = f"{url}/{MINILM}/resolve/main/model.safetensors"
        head = httpx.head(resolve)
        assert head.status_code == 200 and head.headers["x-repo-commit"] == model.fingerprint
        assert head.headers["x-linked-etag"] == f'"{entry.by_path()["model.safetensors"].sha256}"'
        assert int(head.headers["content-length"]) == len(weights) and head.content == b""
        resumed = httpx.get(resolve, headers={"Range": "bytes=1000-"})  # an interrupted pull resumes
        assert resumed.status_code == 206 and resumed.content == weights[1000:]
        assert httpx.get(f"{url}/{MINILM}/resolve/main/../../../etc/passwd").status_code == 404
        assert httpx.get(f"{url}/{MINILM}/resolve/main/onnx/model.onnx").status_code == 404  # never pulled


def test_a_server_with_no_hub_pulls_locked_from_the_mirror(origin: tuple[Path, LocalModel], tmp_path: Path) -> None:
    home, model = origin
    lock = Lock.read(home / "deploykit.lock")
    fleet = ModelStore(tmp_path / "fleet")
    with serve_in_thread(create_mirror(origin_repos(home))) as url:
        pulled = pull(
            ALIAS, store=fleet, catalog=CATALOG, endpoint=url, cache_dir=tmp_path / "hf", lock=lock, locked=True
        )
    assert pulled.fingerprint == model.fingerprint and pulled.source == model.source
    check_models([pulled], lock)  # the same bytes as the lock's, file by file


def test_bundled_and_unlocked_models_are_served_at_their_commit(
    origin: tuple[Path, LocalModel], tmp_path: Path
) -> None:
    home, model = origin
    locked = origin_repos(home)[MINILM]
    unlocked = mirror_repos(ModelStore(home / "models"), Lock(tmp_path / "none.lock"))[MINILM]
    assert unlocked.files == locked.files  # hashed at start-up: the same sha256 as the lock's
    # an air-gapped mirror: filled from a bundle, not from the hub
    bundle = export_bundle([model], tmp_path / "minilm.tar", lock=Lock.read(home / "deploykit.lock")).path
    site = ModelStore(tmp_path / "site" / "models")
    import_bundle(bundle, site, lock=Lock(tmp_path / "site" / "deploykit.lock"))
    bundled = mirror_repos(site, Lock.read(tmp_path / "site" / "deploykit.lock"))[MINILM]
    assert bundled.commit == model.fingerprint and bundled.alias == ALIAS
    assert {p: (f.size, f.sha256) for p, f in bundled.files.items()} == {
        p: (f.size, f.sha256) for p, f in locked.files.items()
    }


def test_serve_hub_command_serves_the_fleet_and_refuses_an_empty_home(
    origin: tuple[Path, LocalModel], tmp_path: Path
) -> None:
    home, model = origin
    cli = [sys.executable, "-m", "deploykit"]
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    empty = subprocess.run([*cli, "serve-hub", str(tmp_path / "empty")], env=env, capture_output=True, text=True)
    assert empty.returncode == 2 and "No model here came from the hub" in empty.stderr
    assert "Traceback" not in empty.stderr

    port = free_port()
    mirror = subprocess.Popen(
        [*cli, "serve-hub", str(home), "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert mirror.poll() is None and time.monotonic() < deadline, "serve-hub did not start"
            try:
                if httpx.get(f"{url}/api/models/{MINILM}").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        shutil.copy(home / "deploykit.lock", tmp_path / "deploykit.lock")  # the lock, committed with the deployment
        fleet = {**env, "HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf"), "DEPLOYKIT_HOME": str(tmp_path / "fleet")}
        pulled = subprocess.run(
            [*cli, "pull", ALIAS, "--locked", "--lock-file", str(tmp_path / "deploykit.lock"), "--json"],
            env=fleet,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert pulled.returncode == 0, pulled.stderr
        assert model.fingerprint in pulled.stdout
    finally:
        mirror.terminate()
        _, stderr = mirror.communicate(timeout=30)
    assert mirror.returncode == 0
    assert f"{MINILM}@{model.fingerprint[:12]}" in stderr and f"HF_ENDPOINT=http://127.0.0.1:{port}" in stderr
