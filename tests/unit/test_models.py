"""The local store, directory import, config.json parsing and memory arithmetic."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from deploykit.core.errors import ModelImportError, UnknownModelError, UsageError
from deploykit.models import ModelStore, import_model, kv_bytes_per_token, read_model_config, weight_bytes
from deploykit.models.config import parse_config

LLAMA2_7B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "torch_dtype": "float16",
    "vocab_size": 32000,
}


def write_safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    """A real safetensors file (float32 zeros) with the given tensor shapes."""
    header: dict[str, object] = {}
    offset = 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tiny"
    d.mkdir()
    config = {
        **LLAMA2_7B_CONFIG,
        "hidden_size": 8,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "num_hidden_layers": 2,
        "max_position_embeddings": 128,
    }
    (d / "config.json").write_text(json.dumps(config))
    write_safetensors(d / "model.safetensors", {"embed": [16, 8], "norm": [8]})
    (d / "tokenizer.json").write_text("{}")
    (d / ".git").mkdir()
    return d


def test_llama2_7b_config_numbers() -> None:
    config = parse_config(LLAMA2_7B_CONFIG)
    assert (config.layers, config.kv_heads, config.head_dim, config.max_context) == (32, 32, 128, 4096)
    assert abs(config.params - 6_738_415_616) / 6_738_415_616 < 0.001  # estimated from shapes
    assert kv_bytes_per_token(config, "float16") == 2 * 32 * 32 * 128 * 2 == 524_288
    assert weight_bytes(config, "bfloat16") == 2 * config.params


def test_grouped_query_attention_shrinks_the_kv_cache() -> None:
    config = parse_config({**LLAMA2_7B_CONFIG, "num_key_value_heads": 8, "max_position_embeddings": 131072})
    assert kv_bytes_per_token(config, "bfloat16") == 2 * 32 * 8 * 128 * 2 == 131_072


def test_config_without_architecture_numbers_is_refused() -> None:
    with pytest.raises(ModelImportError, match="num_hidden_layers"):
        parse_config({"model_type": "mystery"})


def test_params_are_counted_exactly_from_safetensors(model_dir: Path) -> None:
    assert read_model_config(model_dir).params == 16 * 8 + 8


def test_import_a_directory_then_again_is_a_no_op(model_dir: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    model, written = import_model(model_dir, "tiny", store)
    assert written
    assert sorted(p.name for p in model.path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert model.format == "hf-dir" and model.size_bytes > 0
    again, written = import_model(model_dir, "tiny", store)
    assert not written and again == model
    assert store.aliases() == ["tiny"]


def test_import_under_a_taken_alias_needs_force(model_dir: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    import_model(model_dir, "tiny", store)
    (model_dir / "extra.txt").write_text("changed")
    with pytest.raises(ModelImportError, match="already in the store") as e:
        import_model(model_dir, "tiny", store)
    assert "--force" in e.value.hint
    model, written = import_model(model_dir, "tiny", store, force=True)
    assert written and (model.path / "extra.txt").exists()


def test_failed_import_leaves_nothing_behind(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")

    def broken(out: Path) -> None:
        (out / "half-written.safetensors").write_bytes(b"x" * 100)
        raise OSError("disk full")

    with pytest.raises(OSError):
        store.add("m", source="s", format="hf-dir", fingerprint="f", build=broken)
    assert store.models() == []
    assert list((tmp_path / "store").iterdir()) == []


@pytest.mark.parametrize("name", ["Bad Alias", "../escape", "", "-x"])
def test_invalid_alias(model_dir: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(UsageError):
        import_model(model_dir, name, ModelStore(tmp_path))


def test_bad_sources_say_what_to_pass(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelImportError, match="does not exist"):
        import_model(tmp_path / "nope.gguf", "x", store)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelImportError, match=r"neither a \.gguf file nor a model directory"):
        import_model(tmp_path / "notes.txt", "x", store)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelImportError, match=r"No config\.json"):
        import_model(tmp_path / "empty", "x", store)


def test_directory_without_weights_is_refused(model_dir: Path, tmp_path: Path) -> None:
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ModelImportError, match="no weights"):
        import_model(model_dir, "x", ModelStore(tmp_path / "store"))


def test_unknown_model_suggests_close_matches(model_dir: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    import_model(model_dir, "smollm2-135m", store)
    with pytest.raises(UnknownModelError) as e:
        store.get("smolm2-135m")
    assert e.value.close_matches == ["smollm2-135m"]
    assert "Did you mean: smollm2-135m?" in e.value.hint
    assert e.value.exit_code == 3


def test_rm_frees_the_space(model_dir: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    model, _ = import_model(model_dir, "tiny", store)
    assert store.remove("tiny") == model.size_bytes
    assert store.models() == []
