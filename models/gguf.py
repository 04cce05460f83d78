"""Convert a GGUF file into a standard Hugging Face model directory (safetensors, config, tokenizer).

vLLM loads Hugging Face directories best, so a GGUF file is dequantized once at import time through
transformers' GGUF reader and saved as bfloat16 safetensors with its tokenizer and chat template.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from deploykit.core.errors import MissingDependencyError, ModelImportError


def convert_gguf(gguf: Path, out: Path, progress: Callable[[str], None] = lambda _m: None) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise MissingDependencyError(
            f"Converting a GGUF file needs torch, transformers and gguf ({e}).",
            "Install an engine extra: pip install 'deploykit[cpu]' (or 'deploykit[gpu]' on NVIDIA GPUs).",
        ) from e
    try:
        progress("reading the tokenizer and chat template")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        progress("dequantizing the weights")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise ModelImportError(
            f"transformers could not read {gguf.name}: {e}",
            "Only GGUF files of architectures transformers supports (llama, mistral, qwen2, gemma, phi3, ...) "
            "can be imported.",
        ) from e
    # save_pretrained refuses a model that still carries its GGUF quantizer; the weights are plain now.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    progress("writing safetensors")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if tokenizer.chat_template is None:
        progress("warning: the GGUF file carries no chat template; only /v1/completions will work")
