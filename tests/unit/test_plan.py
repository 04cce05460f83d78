"""The launch plan, as tables of hardware x model with hand-checked numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploykit.core.errors import NotEnoughMemoryError, UsageError
from deploykit.models.config import ModelConfig
from deploykit.models.fit import Batching, gpu_runtime, kv_cache_tokens
from deploykit.serve.hardware import Gpu, Hardware
from deploykit.serve.plan import LaunchPlan, _core_list, plan_launch

GIB = 1024**3

SMOLLM2 = ModelConfig("LlamaForCausalLM", 30, 576, 9, 3, 64, 8192, "bfloat16", 134_515_008)
LLAMA2_7B = ModelConfig("LlamaForCausalLM", 32, 4096, 32, 32, 128, 4096, "float16", 6_738_415_616)
LLAMA2_13B = ModelConfig("LlamaForCausalLM", 40, 5120, 40, 40, 128, 4096, "float16", 13_015_864_320)
LLAMA2_70B = ModelConfig("LlamaForCausalLM", 80, 8192, 64, 8, 128, 4096, "float16", 68_976_648_192)
PHI3_MINI = ModelConfig("Phi3ForCausalLM", 32, 3072, 32, 32, 96, 4096, "bfloat16", 3_821_079_552)

LAPTOP = Hardware(cpu_ids=(0, 1), ram_total_bytes=24 * GIB, ram_available_bytes=22 * GIB)


def gpus(n: int, name: str, gib: int, cc: float) -> Hardware:
    return Hardware(
        cpu_ids=tuple(range(16)),
        ram_total_bytes=256 * GIB,
        ram_available_bytes=250 * GIB,
        gpus=tuple(Gpu(i, name, gib * GIB, gib * GIB, cc) for i in range(n)),
    )


def plan(config: ModelConfig, hw: Hardware, *extra: str, environ: dict[str, str] | None = None) -> LaunchPlan:
    return plan_launch(
        Path("/m"), "m", config, hw, port=9999, extra_args=extra, environ=environ, python="/venv/bin/python"
    )


def flag(p: LaunchPlan, name: str) -> str:
    assert p.argv.count(name) == 1, p.argv
    return p.argv[p.argv.index(name) + 1]


def test_kv_capacity_matches_what_vllm_logged_for_smollm2_with_1_gib() -> None:
    # DESIGN.md: 2 x 30 layers x 3 kv heads x 64 x 4 B = 46,080 B/token; vLLM logged 23,296 tokens.
    assert kv_cache_tokens(GIB, 46_080) == 23_296


def test_cpu_plan_for_smollm2_on_two_cores() -> None:
    p = plan(SMOLLM2, LAPTOP)
    assert p.device == "cpu"
    assert p.argv[:3] == ("/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server")
    assert flag(p, "--model") == "/m"
    assert flag(p, "--dtype") == "float32"
    # 4 x 8192 tokens x 46,080 B = 1.41 GiB -> 2 GiB; 2 GiB / 46,080 B = 46,603 -> 46,592 in 16-token blocks
    assert p.env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert p.kv_cache_tokens == 46_592
    assert flag(p, "--max-model-len") == "8192"
    assert p.env["VLLM_CPU_OMP_THREADS_BIND"] == "0"  # core 1 is left for the gateway
    assert (flag(p, "--host"), flag(p, "--port"), flag(p, "--served-model-name")) == ("127.0.0.1", "9999", "m")
    assert {c.setting for c in p.choices} >= {"--dtype", "VLLM_CPU_KVCACHE_SPACE", "--max-model-len"}
    assert all(c.why for c in p.choices)


def test_cpu_plan_uses_bfloat16_for_larger_models_and_binds_all_but_one_core() -> None:
    hw = Hardware(cpu_ids=(0, 1, 2, 3), ram_total_bytes=64 * GIB, ram_available_bytes=60 * GIB)
    p = plan(PHI3_MINI, hw)
    assert flag(p, "--dtype") == "bfloat16"
    assert p.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-2"


def test_cpu_plan_keeps_the_users_kv_cache_setting() -> None:
    p = plan(SMOLLM2, LAPTOP, environ={"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert "VLLM_CPU_KVCACHE_SPACE" not in p.env  # the user's environment reaches the engine as it is
    assert p.kv_cache_tokens == 23_296


def test_cpu_plan_keeps_compiled_graphs_where_a_restart_finds_them_and_one_process_fewer() -> None:
    # vllm-cpu's AOT cache never loads (a warm start compiled again); inductor's own cache does, beside vLLM's
    for environ, folder in [
        ({"VLLM_CACHE_ROOT": "/data/vllm", "XDG_CACHE_HOME": "/x", "HOME": "/h"}, "/data/vllm/torchinductor"),
        ({"XDG_CACHE_HOME": "/x", "HOME": "/h"}, "/x/vllm/torchinductor"),
        ({"HOME": "/h"}, "/h/.cache/vllm/torchinductor"),
    ]:
        p = plan(SMOLLM2, LAPTOP, environ=environ)
        assert p.env["VLLM_USE_AOT_COMPILE"] == "0" and p.env["TORCHINDUCTOR_CACHE_DIR"] == folder
        assert p.env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        why = {c.setting: c.why for c in p.choices}
        assert "every start compiled again" in why["VLLM_USE_AOT_COMPILE"]
        assert "not /tmp" in why["TORCHINDUCTOR_CACHE_DIR"]
    mine = {"VLLM_USE_AOT_COMPILE": "1", "TORCHINDUCTOR_CACHE_DIR": "/mine", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    p = plan(SMOLLM2, LAPTOP, environ=mine)
    assert not p.env.keys() & mine.keys()  # theirs reach the engine as they are
    shown = {c.setting: (c.value, c.why) for c in p.choices}
    assert shown["VLLM_USE_AOT_COMPILE"] == ("1", "set in your environment")
    assert shown["TORCHINDUCTOR_CACHE_DIR"] == ("/mine", "set in your environment")


def test_cpu_too_small_says_how_much_is_needed() -> None:
    with pytest.raises(NotEnoughMemoryError) as e:
        plan(LLAMA2_70B, LAPTOP)
    assert "GiB of RAM" in e.value.message
    assert "22.0 GiB is available" in e.value.message
    assert e.value.exit_code == 4
    assert "parameters" in e.value.hint


def test_one_a100_serves_llama2_7b_without_tensor_parallel() -> None:
    p = plan(LLAMA2_7B, gpus(1, "NVIDIA A100-SXM4-80GB", 80, 8.0))
    assert p.argv[:3] == ("/venv/bin/vllm", "serve", "/m")
    assert flag(p, "--dtype") == "bfloat16"
    assert flag(p, "--tensor-parallel-size") == "1"
    assert flag(p, "--gpu-memory-utilization") == "0.90"
    assert flag(p, "--max-model-len") == "4096"
    # 72 GiB - vLLM's runtime on an A100 (its batching there: 256 sequences, 2048 tokens; about 1.3 GiB)
    # - 13.48 GB weights, at 2 x 32 x 32 x 128 x 2 B = 524,288 B/token
    runtime = gpu_runtime(LLAMA2_7B, "bfloat16", 1, Batching(256, 2048)).total
    assert 1.2 * GIB < runtime < 1.4 * GIB
    kv_bytes = int(80 * GIB * 0.9) - runtime - 2 * 6_738_415_616
    assert p.kv_cache_tokens == kv_bytes // 524_288 // 16 * 16
    assert 119_000 < p.kv_cache_tokens < 119_500
    assert p.env == {"CUDA_VISIBLE_DEVICES": "0"}


def test_llama2_13b_needs_two_24gb_gpus() -> None:
    p = plan(LLAMA2_13B, gpus(2, "NVIDIA L4", 24, 8.9))
    assert flag(p, "--tensor-parallel-size") == "2"
    assert p.env == {"CUDA_VISIBLE_DEVICES": "0,1"}
    runtime = gpu_runtime(LLAMA2_13B, "bfloat16", 2, Batching(256, 2048)).total  # L4s: 256 sequences, 2048 tokens
    per_gpu = int(24 * GIB * 0.9) - runtime - 2 * 13_015_864_320 // 2
    assert p.kv_cache_tokens == 2 * per_gpu // 819_200 // 16 * 16


def test_llama2_70b_on_eight_h100_takes_the_fewest_gpus_that_hold_it() -> None:
    p = plan(LLAMA2_70B, gpus(8, "NVIDIA H100 80GB HBM3", 80, 9.0))
    # 137.95 GB of weights do not fit on one 80 GB GPU; two hold 69 GB each, and after vLLM's runtime on an
    # H100 with tensor parallelism (about 4.6 GiB a GPU: all-reduce buffers, a 1024-sequence profiling step,
    # CUDA graphs for 80 layers) ~20k tokens of KV: the Qwen2.5-72B log of docs/SIZING.md kept 3 GiB
    assert flag(p, "--tensor-parallel-size") == "2"
    assert p.gpu_indices == (0, 1)
    assert 19_000 < p.kv_cache_tokens < 21_000
    [tp] = [c for c in p.choices if c.setting == "--tensor-parallel-size"]
    assert tp.why == (
        "128.5 GiB of weights need 2 GPUs (64.2 GiB each) to leave room for KV cache, after the 4.7 GiB vLLM keeps "
        "beside them on each GPU"
    )


def test_t4_gets_float16() -> None:
    p = plan(PHI3_MINI, gpus(1, "Tesla T4", 16, 7.5))
    assert flag(p, "--dtype") == "float16"
    assert flag(p, "--tensor-parallel-size") == "1"


def test_model_that_fits_nowhere_names_the_need() -> None:
    with pytest.raises(NotEnoughMemoryError) as e:
        plan(LLAMA2_70B, gpus(1, "NVIDIA A10G", 24, 8.6))
    assert "does not fit" in e.value.message and "A10G" in e.value.message
    assert "more or larger GPUs" in e.value.hint


def test_user_flags_win_and_pass_through() -> None:
    p = plan(SMOLLM2, LAPTOP, "--dtype=bfloat16", "--enforce-eager", "--max-model-len", "2048")
    assert "--dtype" not in p.argv and "--dtype=bfloat16" in p.argv
    assert flag(p, "--max-model-len") == "2048"
    assert p.argv[-4:] == ("--dtype=bfloat16", "--enforce-eager", "--max-model-len", "2048")
    yours = {c.setting for c in p.choices if c.value == "(yours)"}
    assert yours == {"--dtype", "--max-model-len"}


@pytest.mark.parametrize("hw", [LAPTOP, gpus(1, "NVIDIA A100-SXM4-80GB", 80, 8.0)])
def test_the_model_cards_sampling_becomes_the_engines_default_unless_you_pass_your_own(hw: Hardware) -> None:
    def with_card(*extra: str) -> LaunchPlan:
        sampling = {"temperature": 0.2, "top_p": 0.9}
        return plan_launch(Path("/m"), "m", SMOLLM2, hw, port=9999, extra_args=extra, sampling=sampling)

    assert flag(with_card(), "--override-generation-config") == '{"temperature":0.2,"top_p":0.9}'
    assert "--override-generation-config" not in plan(SMOLLM2, hw).argv
    yours = with_card("--override-generation-config", '{"temperature":0}')
    assert flag(yours, "--override-generation-config") == '{"temperature":0}'
    assert {c.setting: c.value for c in yours.choices}["--override-generation-config"] == "(yours)"


@pytest.mark.parametrize("flag_name", ["--port", "--host", "--model"])
def test_the_gateway_owns_the_engines_address(flag_name: str) -> None:
    with pytest.raises(UsageError):
        plan(SMOLLM2, LAPTOP, flag_name, "x")


@pytest.mark.parametrize(
    ("cores", "expected"), [((0,), "0"), ((0, 1, 2), "0-2"), ((0, 1, 2, 5), "0-2,5"), ((1, 3, 4), "1,3-4")]
)
def test_core_list(cores: tuple[int, ...], expected: str) -> None:
    assert _core_list(cores) == expected


def test_lora_adapters_are_served_by_name_with_the_smallest_rank_vllm_allows(tmp_path: Path) -> None:
    from deploykit.serve.plan import read_adapter, with_adapters

    for name, rank in (("a", 8), ("b", 12)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    adapters = [read_adapter(f"{n}={tmp_path / n}") for n in ("a", "b")]
    base = plan(SMOLLM2, LAPTOP)
    served = with_adapters(base, adapters)
    tail = list(served.argv[len(base.argv) :])
    assert tail == [
        "--enable-lora",
        "--max-lora-rank",
        "16",
        "--lora-modules",
        f"a={tmp_path / 'a'}",
        f"b={tmp_path / 'b'}",
    ]
    assert served.adapters == ("a", "b")
    assert with_adapters(base, []) is base


@pytest.mark.parametrize(
    ("spec", "message"),
    [("noequals", "NAME=PATH"), ("x=/nonexistent", "No adapter_config.json"), ("x={bad}", "rank")],
)
def test_bad_lora_specs_say_what_is_wrong(tmp_path: Path, spec: str, message: str) -> None:
    from deploykit.serve.plan import read_adapter

    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(UsageError, match=message):
        read_adapter(spec.replace("{bad}", str(tmp_path)))


def test_keys_with_database_make_every_engine_schedule_by_priority(tmp_path: Path) -> None:
    from deploykit.core.settings import Settings
    from deploykit.serve.accounting.database import opened
    from deploykit.serve.accounting.keys import create_key, revoke_key
    from deploykit.serve.plan import schedules_by_priority, with_priority
    from deploykit.serve.runner import ServeOptions, with_database

    base = plan(SMOLLM2, LAPTOP)
    tiered = with_priority(base)
    assert list(tiered.argv[len(base.argv) :]) == ["--scheduling-policy", "priority"]
    assert schedules_by_priority(tiered) and not schedules_by_priority(base)
    own = plan(SMOLLM2, LAPTOP, "--scheduling-policy", "fcfs")
    assert with_priority(own) is own and not schedules_by_priority(own)  # the user's own policy stays

    settings = Settings(home=tmp_path)
    keys_on = ServeOptions(auth=True)
    with opened(settings.database) as db:
        create_key(db, "web")
    plans, options = with_database(settings, [base], keys_on)
    assert plans == [base] and options.priority_models == ()  # every key normal: first come, first served
    with opened(settings.database) as db:
        create_key(db, "evals", priority="batch")
    plans, options = with_database(settings, [base], keys_on)
    assert plans == [tiered] and options.priority_models == ("m",)
    assert with_database(settings, [base], ServeOptions(auth=False))[0] == [base]  # no keys, no tiers
    with opened(settings.database) as db:
        revoke_key(db, "evals")
    assert with_database(settings, [base], keys_on)[0] == [base]


def test_registered_adapters_or_lora_on_demand_ready_the_engines_for_runtime_lora(tmp_path: Path) -> None:
    from deploykit.core.settings import Settings
    from deploykit.serve.accounting.adapters import add_adapter
    from deploykit.serve.accounting.database import opened
    from deploykit.serve.plan import with_runtime_lora
    from deploykit.serve.runner import ServeOptions, with_database

    settings = Settings(home=tmp_path)
    first, second = (
        plan(SMOLLM2, LAPTOP),
        plan_launch(Path("/m2"), "m2", SMOLLM2, LAPTOP, port=9998, python="/venv/bin/python"),
    )
    assert with_database(settings, [first, second], ServeOptions())[0] == [first, second]
    on_demand = with_database(settings, [first, second], ServeOptions(lora_on_demand=True))[0]
    assert on_demand == [with_runtime_lora(first), second]  # the first model's, as --lora
    with opened(settings.database) as db:
        add_adapter(db, "support", "m2", "/a/support", 8)
    assert with_database(settings, [first, second], ServeOptions())[0] == [first, with_runtime_lora(second)]


def test_engines_that_share_cores_let_idle_threads_sleep() -> None:
    first, second = LAPTOP.split(2)  # two engines on a 2-core machine: both on core 0
    assert first.shares_cores and second.shares_cores
    assert plan(SMOLLM2, second).env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in plan(SMOLLM2, LAPTOP).env  # one engine: its threads may spin
