"""Which stored models a site mirror serves, and under which names (the protocol itself is checked with
huggingface_hub in tests/integration/test_mirror.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from deploykit.models.mirror import MirrorFile, hub_identity
from deploykit.models.store import LocalModel

COMMIT = "a" * 40


def model(source: str, format: str, fingerprint: str = COMMIT) -> LocalModel:
    return LocalModel("m", Path("/m"), source, format, fingerprint, 1, "2026-12-05T00:00:00+00:00")


def test_only_models_from_the_hub_at_a_known_commit_are_served() -> None:
    assert hub_identity(model(f"hf://org/name@{COMMIT}", "hub")) == ("org/name", COMMIT)
    assert hub_identity(model(f"hf://gpt2@{COMMIT}", "bundle")) == ("gpt2", COMMIT)  # a bundle of a hub model
    assert hub_identity(model("/home/me/model.gguf", "gguf", "f" * 64)) is None  # a local import
    assert hub_identity(model(f"hf://org/name@{COMMIT}", "dir")) is None
    assert hub_identity(model(f"hf://org/name@{'b' * 40}", "hub")) is None  # source and fingerprint disagree
    assert hub_identity(model(f"hf://@{COMMIT}", "hub")) is None


def test_a_file_is_listed_with_the_git_oid_of_its_lfs_pointer() -> None:
    # the pointer git-lfs writes for a file, hashed as git hashes a blob (`git hash-object` of the pointer)
    f = MirrorFile("model.safetensors", Path("/x"), 90_868_376, "5" * 64)
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{'5' * 64}\nsize 90868376\n"
    oid = subprocess.run(["git", "hash-object", "--stdin"], input=pointer, capture_output=True, text=True, check=True)
    assert f.pointer_oid == oid.stdout.strip()
