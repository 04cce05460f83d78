"""What a careless operator or a hostile name can do through the CLI: nothing outside the store is ever
touched, every bad name is one message and an exit code, and the deploykit database is private."""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path

import pytest

from deploykit.core.errors import ModelImportError, UnknownModelError, UsageError
from deploykit.models.catalog import load_catalog
from deploykit.models.config import count_safetensors_params
from deploykit.models.resolve import resolve
from deploykit.models.store import ModelStore, check_alias
from deploykit.serve.accounting.database import connect
from deploykit.serve.accounting.keys import create_key
from tests.unit.test_cli import assert_clean_failure, deploykit
from tests.unit.test_models import LLAMA2_7B_CONFIG, write_safetensors


def victim(root: Path) -> Path:
    """A directory outside the store that looks like a model entry (all the old check needed)."""
    target = root / "victim"
    target.mkdir()
    (target / "manifest.json").write_text(
        json.dumps(
            {
                "alias": "victim",
                "source": "x",
                "format": "hf-dir",
                "fingerprint": "x",
                "size_bytes": 1,
                "added_at": "2026-01-01T00:00:00",
            }
        )
    )
    (target / "precious.txt").write_text("keep me")
    return target


@pytest.mark.parametrize("name", ["../../victim", "ok/../../../victim", "ABSOLUTE"])
def test_models_rm_never_leaves_the_store(tmp_path: Path, name: str) -> None:
    target = victim(tmp_path)
    home = tmp_path / "home"
    (home / "models" / "ok").mkdir(parents=True)  # so that ok/.. resolves
    name = str(target) if name == "ABSOLUTE" else name
    result = deploykit(home, "models", "rm", name)
    assert_clean_failure(result, 3, "Unknown model")
    assert (target / "precious.txt").read_text() == "keep me"


def test_the_store_refuses_every_name_that_is_not_an_alias(tmp_path: Path) -> None:
    target = victim(tmp_path)
    store = ModelStore(tmp_path / "models")
    (tmp_path / "models").mkdir()
    for name in ("../victim", str(target), "victim/..", "a" * 5000, "abc\n"):
        assert store.find(name) is None
        with pytest.raises(UnknownModelError):
            store.remove(name)
    assert target.exists()


@pytest.mark.parametrize("alias", ["abc\n", "../x", "Abc", "", "a" * 65, "-x"])
def test_an_alias_is_one_plain_folder_name(alias: str) -> None:
    with pytest.raises(UsageError):
        check_alias(alias)


def test_an_alias_with_a_trailing_newline_is_refused_by_import(tmp_path: Path) -> None:
    result = deploykit(tmp_path / "home", "models", "import", str(tmp_path), "--alias", "abc\n")
    assert_clean_failure(result, 2, "not a valid model alias")
    assert not (tmp_path / "home" / "models").exists() or not any((tmp_path / "home" / "models").iterdir())


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (("pull", "../../etc/passwd"), 2, "not a hub repo id"),
        (("pull", "org/" + "a" * 300), 2, "not a hub repo id"),
        (("models", "rm", "a" * 5000), 3, "Unknown model"),
        (("models", "show", "../../x"), 2, "not a hub repo id"),
    ],
)
def test_hostile_names_are_one_message_and_an_exit_code(
    tmp_path: Path, args: tuple[str, ...], code: int, says: str
) -> None:
    assert_clean_failure(deploykit(tmp_path, *args), code, says)


def test_a_hub_name_whose_alias_the_store_would_refuse_fails_before_any_download() -> None:
    with pytest.raises(UsageError, match="not a valid model alias"):
        resolve("org/" + "a" * 90, ModelStore(Path("/nonexistent")), load_catalog())
    model = resolve("Qwen/Qwen2.5-7B-Instruct@v1", ModelStore(Path("/nonexistent")), load_catalog())
    assert (model.alias, model.repo, model.revision) == ("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct", "v1")


def lying_model(root: Path, header_length: int, header: bytes = b"{}") -> Path:
    src = root / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(LLAMA2_7B_CONFIG))
    (src / "model.safetensors").write_bytes(struct.pack("<Q", header_length) + header)
    return src


@pytest.mark.parametrize(
    ("length", "header"),
    [(2**62, b"{}"), (10, b"[[[[[[[[[["), (20_000, b"[" * 20_000), (2, b"[]"), (3, b"")],
)
def test_a_safetensors_file_with_a_lying_header_is_refused(tmp_path: Path, length: int, header: bytes) -> None:
    src = lying_model(tmp_path, length, header)
    with pytest.raises(ModelImportError, match="not a valid safetensors file"):
        count_safetensors_params(src / "model.safetensors")


def test_import_of_a_lying_safetensors_header_is_one_message(tmp_path: Path) -> None:
    src = lying_model(tmp_path, 2**62)
    result = deploykit(tmp_path / "home", "models", "import", str(src), "--alias", "liar")
    assert_clean_failure(result, 7, "not a valid safetensors file")


def test_a_real_safetensors_header_still_counts(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "w.safetensors", {"a": [3, 4], "b": [5]})
    assert count_safetensors_params(tmp_path / "w.safetensors") == 17


# keys


@pytest.mark.parametrize("models", [",", " , ", ""])
def test_a_key_for_no_model_is_refused_not_made_a_key_for_every_model(tmp_path: Path, models: str) -> None:
    result = deploykit(tmp_path, "keys", "create", "--name", "team-a", "--models", models)
    assert_clean_failure(result, 2, "--models names no model")
    assert json.loads(deploykit(tmp_path, "keys", "list", "--json").stdout) == []


@pytest.mark.parametrize("name", ["", "[/bold]", "a b", "x" * 65, "team\n", "-lead", "ünïcode"])
def test_key_names_are_validated(tmp_path: Path, name: str) -> None:
    result = deploykit(tmp_path, "keys", "create", "--name", name)
    assert_clean_failure(result, 2, "not a valid key name")
    assert json.loads(deploykit(tmp_path, "keys", "list", "--json").stdout) == []


def test_user_text_in_console_markup_is_printed_as_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    db = connect(f"sqlite:///{tmp_path / 'deploykit.db'}")
    create_key(db, "team-a", models=["[/bold]", "[red]x"])
    db.close()
    result = deploykit(tmp_path, "keys", "list")
    assert result.returncode == 0, result.stderr
    assert "[/bold]" in result.stdout and "[red]x" in result.stdout


def test_the_database_and_home_are_private(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert deploykit(home, "keys", "create", "--name", "team-a").returncode == 0
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    files = [p for p in home.iterdir() if p.name.startswith("deploykit.db")]
    assert files
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_an_existing_database_readable_by_others_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "deploykit.db"
    connect(f"sqlite:///{path}").close()
    os.chmod(path, 0o644)
    connect(f"sqlite:///{path}").close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
