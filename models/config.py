"""The architecture numbers of a model, read from its config.json and safetensors headers."""

from __future__ import annotations

import contextlib
import json
import math
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from deploykit.core.errors import ModelImportError

# The safetensors format caps its JSON header at 100 MB.
_SAFETENSORS_MAX_HEADER = 100_000_000
# Weights are stored in this dtype when config.json does not say.
_DEFAULT_DTYPE = "float32"


@dataclass(frozen=True)
class ModelConfig:
    """What sizing needs to know about a model; `params` is exact when read from safetensors."""

    architecture: str
    layers: int
    hidden_size: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    max_context: int
    dtype: str
    params: int
    quantized: bool = False
    intermediate_size: int = 0  # the MLP's width; 0: not known (4 x hidden is assumed)
    vocab_size: int = 32_000

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    @property
    def is_small(self) -> bool:
        """Small enough that float32 on a CPU is cheap (and bfloat16 kernels are not worth the risk)."""
        return self.params <= 2_000_000_000


def parse_config(raw: dict[str, Any], params: int | None = None) -> ModelConfig:
    """Build a ModelConfig from a parsed config.json; `params` overrides the estimate from shapes."""
    text = raw.get("text_config") or raw  # multimodal configs nest the language model's numbers
    try:
        layers = int(text["num_hidden_layers"])
        hidden = int(text["hidden_size"])
        heads = int(text["num_attention_heads"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelImportError(
            f"config.json lacks the architecture field {e}.",
            "Is this a transformer model directory from the Hugging Face hub?",
        ) from e
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or hidden // heads)
    context = int(text.get("max_position_embeddings") or 2048)
    dtype = str(raw.get("torch_dtype") or raw.get("dtype") or text.get("torch_dtype") or _DEFAULT_DTYPE)
    architectures = raw.get("architectures") or [raw.get("model_type", "unknown")]
    if params is None:
        params = _estimate_params(text, layers, hidden, heads, kv_heads, head_dim)
    return ModelConfig(
        architecture=str(architectures[0]),
        layers=layers,
        hidden_size=hidden,
        attention_heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        max_context=context,
        dtype=dtype,
        params=params,
        quantized=bool(raw.get("quantization_config")),
        intermediate_size=int(text.get("intermediate_size") or 0),
        vocab_size=int(text.get("vocab_size") or 32_000),
    )


def read_model_config(model_dir: Path) -> ModelConfig:
    """Read config.json from a model directory, with the exact parameter count from its safetensors."""
    path = model_dir / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ModelImportError(f"No config.json in {model_dir}.", "A model directory needs one.") from e
    except (ValueError, RecursionError) as e:
        raise ModelImportError(f"{path} is not valid JSON: {e}.") from e
    if not isinstance(raw, dict):
        raise ModelImportError(f"{path} is not a JSON object.", "A model directory's config.json describes it.")
    weights = sorted(model_dir.glob("*.safetensors"))
    params = sum(count_safetensors_params(w) for w in weights) if weights else None
    config = parse_config(raw, params)
    # sentence-transformers models cap their input below the position table; vLLM takes that cap too
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, TypeError, ValueError):
        cap = int(json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"])
        config = replace(config, max_context=min(config.max_context, cap))
    return config


def count_safetensors_params(path: Path) -> int:
    """Count the parameters in a safetensors file from its header alone (no tensor data is read). The header's
    declared length is checked against the file and the format's 100 MB cap before anything is read."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(_SAFETENSORS_MAX_HEADER, path.stat().st_size - 8):
                raise ValueError(f"its header claims {length:,} bytes")
            header = json.loads(f.read(length))
        return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    except (struct.error, ValueError, RecursionError, TypeError, KeyError, AttributeError) as e:
        raise ModelImportError(
            f"{path.name} is not a valid safetensors file ({e}).", "Copy the file again from its source."
        ) from e


def _estimate_params(text: dict[str, Any], layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int) -> int:
    """A decoder's parameter count from its shapes: attention, gated MLP, embeddings."""
    intermediate = int(text.get("intermediate_size") or 4 * hidden)
    vocab = int(text.get("vocab_size") or 32000)
    experts = int(text.get("num_local_experts") or 1)
    attention = hidden * head_dim * (heads + 2 * kv_heads) + heads * head_dim * hidden
    mlp = 3 * hidden * intermediate * experts
    embeddings = vocab * hidden * (1 if text.get("tie_word_embeddings") else 2)
    return layers * (attention + mlp + 2 * hidden) + embeddings
