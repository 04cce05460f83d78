"""The lock file's format: what is written reads back the same, and hostile entries are refused."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from deploykit.core.errors import LockError
from deploykit.models.lock import Lock, LockedFile, LockEntry, check_path, parse_entries, render

SHA = "ab" * 32


def test_a_lock_reads_back_what_was_written(tmp_path: Path) -> None:
    local = LockEntry("local-gguf", "/models/x.gguf", (LockedFile("config.json", 3, SHA),))
    files = (LockedFile("a b.json", 2, "cd" * 32), LockedFile("b/weights.safetensors", 10, SHA))
    entry = LockEntry("tiny.model", 'hf://org/ti"ny\\model@c0ffee', files, "org/tiny", "main", "c0ffee")
    lock = Lock(tmp_path / "sub" / "deploykit.lock")
    lock.put(entry, local)
    assert Lock.read(lock.path).entries == {"tiny.model": entry, "local-gguf": local}
    assert tomllib.loads(lock.path.read_text())["version"] == 1
    assert [p.name for p in lock.path.parent.iterdir()] == ["deploykit.lock"]  # no temporary file left


@pytest.mark.parametrize("path", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a\\..\\b", "a\0b", "a/."])
def test_paths_that_could_leave_a_model_directory_are_refused(path: str) -> None:
    with pytest.raises(ValueError):
        check_path(path)
    data = tomllib.loads(render([LockEntry("m", "s", (LockedFile("ok.json", 1, SHA),))]).replace("ok.json", "X"))
    data["models"]["m"]["files"][0]["path"] = path
    with pytest.raises(LockError, match="malformed"):
        parse_entries(data)


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["models"].update({"../up": d["models"].pop("m")}),  # an alias that is a path
        lambda d: d["models"]["m"]["files"][0].update(sha256="0" * 63),
        lambda d: d["models"]["m"]["files"][0].update(size="big"),
        lambda d: d["models"]["m"].pop("files"),
        lambda d: d.update(version=2),
    ],
)
def test_malformed_entries_are_refused(change) -> None:  # type: ignore[no-untyped-def]
    data = tomllib.loads(render([LockEntry("m", "s", (LockedFile("ok.json", 1, SHA),))]))
    parse_entries(data)  # the unchanged entry is fine
    change(data)
    with pytest.raises(LockError):
        parse_entries(data)


def test_a_missing_entry_says_how_to_write_one(tmp_path: Path) -> None:
    with pytest.raises(LockError) as e:
        Lock.read(tmp_path / "deploykit.lock").get("smollm2-135m")
    assert "deploykit pull smollm2-135m" in e.value.hint
    (tmp_path / "deploykit.lock").write_text("version = [")
    with pytest.raises(LockError, match="cannot be read"):
        Lock.read(tmp_path / "deploykit.lock")
