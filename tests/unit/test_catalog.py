"""The catalog data, search filters, and the fit check with hand-checked numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploykit.card import fit_rows, fits_here, show_model
from deploykit.core.errors import DeploykitError, UnknownModelError, UsageError
from deploykit.models.catalog import load_catalog, parse_params
from deploykit.models.config import _estimate_params, parse_config
from deploykit.models.fit import Batching, fit_on, gpu_runtime, kv_bytes_per_token
from deploykit.models.store import ModelStore
from deploykit.serve.hardware import Gpu, Hardware
from tests.unit.test_models import LLAMA2_7B_CONFIG as LLAMA_2_7B

GIB = 1024**3
CATALOG = load_catalog()
A100_USABLE = int(80 * GIB * 0.9)  # vLLM's share of an 80 GB A100
A100 = Batching(256, 2048)  # what vLLM batches on an A100 (its larger H100 defaults exclude A100s)

# Published config.json files (the fields sizing reads), as the hub serves them.
LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "torch_dtype": "bfloat16",
    "vocab_size": 32000,
}


def a100s(n: int) -> Hardware:
    gpus = tuple(Gpu(i, "NVIDIA A100-SXM4-80GB", 80 * GIB, 80 * GIB, 8.0) for i in range(n))
    return Hardware(cpu_ids=tuple(range(32)), ram_total_bytes=512 * GIB, ram_available_bytes=500 * GIB, gpus=gpus)


def test_the_catalog_carries_what_the_issue_names() -> None:
    aliases = {e.alias for e in CATALOG.entries}
    assert len(aliases) == len(CATALOG.entries)
    assert aliases >= {
        "llama-2-7b",
        "llama-2-7b-chat",
        "llama-2-13b",
        "llama-2-70b",
        "llama-3.1-8b-instruct",
        "llama-3.1-70b-instruct",
        "mistral-7b-instruct",
        "mixtral-8x7b-instruct",
        "qwen2.5-7b-instruct",
        "qwen2.5-72b-instruct",
        "phi-3-mini",
        "gemma-2-9b-it",
        "smollm2-135m",
        "all-minilm-l6-v2",
        "bge-small-en",
        "whisper-large-v3",
        "gpt-4o",
        "gpt-4o-mini",
        "gpt-3.5-turbo",
    }


@pytest.mark.parametrize(
    "entry", [e for e in CATALOG.entries if e.servable and e.architecture == "decoder-only"], ids=lambda e: e.alias
)
def test_parameter_counts_agree_with_the_architecture_numbers(entry) -> None:  # type: ignore[no-untyped-def]
    shapes = {
        "intermediate_size": entry.intermediate,
        "vocab_size": entry.vocab,
        "num_local_experts": entry.experts,
        "tie_word_embeddings": entry.tied_embeddings,
    }
    estimate = _estimate_params(shapes, entry.layers, entry.hidden, entry.heads, entry.kv_heads, entry.head_dim)
    assert abs(estimate - entry.params) / entry.params < 0.005


def test_services_are_listed_but_not_servable() -> None:
    gpt = CATALOG.get("gpt-4o-mini")
    assert not gpt.servable and gpt.provider == "openai"
    with pytest.raises(DeploykitError, match="service"):
        gpt.config()


def test_search_filters() -> None:
    def names(**kw: object) -> set[str]:
        return {e.alias for e in CATALOG.search(**kw)}  # type: ignore[arg-type]

    assert names(task="embeddings") == {"all-minilm-l6-v2", "bge-small-en"}
    assert names(license="llama2") == {"llama-2-7b", "llama-2-7b-chat", "llama-2-13b", "llama-2-70b"}
    assert names(text="QWEN") == {"qwen2.5-7b-instruct", "qwen2.5-72b-instruct"}
    small = names(task="text-generation", max_params=parse_params("8b"))
    assert "mistral-7b-instruct" in small and "llama-3.1-70b-instruct" not in small and "gpt-4o" not in small
    assert names(text="llama", license="apache-2.0") == set()


def test_find_by_repo_id_and_close_matches() -> None:
    assert CATALOG.get("meta-llama/llama-2-7b-hf").alias == "llama-2-7b"
    with pytest.raises(UnknownModelError) as e:
        CATALOG.get("lama-2-7b")
    assert "llama-2-7b" in e.value.close_matches


@pytest.mark.parametrize(("text", "count"), [("7b", 7_000_000_000), ("500M", 500_000_000), ("1.5b", 1_500_000_000)])
def test_parse_params(text: str, count: int) -> None:
    assert parse_params(text) == count


def test_parse_params_rejects_words() -> None:
    with pytest.raises(UsageError):
        parse_params("big")


def test_llama_3_1_8b_on_one_a100() -> None:
    config = parse_config(LLAMA_3_1_8B)
    assert kv_bytes_per_token(config, "bfloat16") == 2 * 32 * 8 * 128 * 2 == 131_072
    fit = fit_on(config, "bfloat16", 1, A100_USABLE, 2048, A100)
    weights = 2 * config.params  # 16.06 GB
    assert 16.0e9 < weights < 16.1e9
    runtime = gpu_runtime(config, "bfloat16", 1, A100).total  # about 1.56 GiB: CUDA graphs, its 128K logits
    assert 1.5 * GIB < runtime < 1.6 * GIB
    assert fit.kv_cache_tokens == (A100_USABLE - runtime - weights) // 131_072 // 16 * 16  # about 453k tokens
    assert 450_000 < fit.kv_cache_tokens < 460_000
    assert fit.fits and fit.max_context == 131_072
    assert fit.concurrent_sequences(8192) == fit.kv_cache_tokens // 8192


def test_mixtral_needs_two_a100s() -> None:
    config = parse_config(MIXTRAL_8X7B)
    assert abs(config.params - 46_702_792_704) / 46_702_792_704 < 0.001  # the experts are counted
    one, two = (row.fit for row in fit_rows(config, a100s(2)))
    assert not one.fits and one.kv_cache_tokens == 0  # 93.4 GB of bf16 weights > 72 GiB budget
    assert two.fits
    runtime = gpu_runtime(config, "bfloat16", 2, A100).total  # with the tensor-parallel buffers
    assert two.kv_cache_tokens == 2 * (A100_USABLE - runtime - 2 * config.params // 2) // 131_072 // 16 * 16
    assert two.max_context == 32_768


def test_llama_2_7b_on_one_a100_holds_119k_tokens() -> None:
    fit = fit_on(parse_config(LLAMA_2_7B), "bfloat16", 1, A100_USABLE, 2048, A100)
    assert 119_000 < fit.kv_cache_tokens < 119_500 and fit.max_context == 4096
    assert fit.concurrent_sequences(4096) == 29  # 119,200 // 4096


def test_smollm2_fits_a_laptop_and_llama_70b_does_not() -> None:
    laptop = Hardware(cpu_ids=(0, 1), ram_total_bytes=24 * GIB, ram_available_bytes=22 * GIB)
    assert fits_here(CATALOG.get("smollm2-135m").config(), laptop)
    assert not fits_here(CATALOG.get("llama-2-70b").config(), laptop)
    fitting = {e.alias for e in CATALOG.search(keep=lambda e: e.servable and fits_here(e.config(), laptop))}
    assert "smollm2-135m" in fitting and "phi-3-mini" in fitting and "llama-3.1-70b-instruct" not in fitting


def test_show_a_catalog_model_and_a_service(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    card = show_model(store, CATALOG, "llama-3.1-8b-instruct", a100s(1), seq_len=8192)
    assert card.local is None and card.config is not None
    assert [m.dtype for m in card.memory] == ["float32", "bfloat16", "float16"]
    assert card.memory[1].weight_bytes == 2 * 8_030_261_248
    assert card.to_json()["fit"][0]["fits"] is True  # type: ignore[index]
    service = show_model(store, CATALOG, "gpt-4o", a100s(1))
    assert service.config is None and service.fits == ()
    with pytest.raises(UnknownModelError):
        show_model(store, CATALOG, "no-such-model", a100s(1))
