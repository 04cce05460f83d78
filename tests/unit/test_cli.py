"""The CLI as a user runs it: real subprocesses, exit codes, one clear message and no traceback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_models import LLAMA2_7B_CONFIG, write_safetensors

CLI = [sys.executable, "-m", "deploykit"]


def deploykit(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEPLOYKIT_HOME": str(home)}
    env.pop("DEPLOYKIT_DEBUG", None)
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120)


def assert_clean_failure(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding a tiny model (real safetensors) and a 70B-sized one (config only, dummy .bin)."""
    root = tmp_path_factory.mktemp("cli")
    tiny = root / "src-tiny"
    tiny.mkdir()
    small = {**LLAMA2_7B_CONFIG, "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
    (tiny / "config.json").write_text(json.dumps(small))
    write_safetensors(tiny / "model.safetensors", {"w": [64, 64]})
    huge = root / "src-huge"
    huge.mkdir()
    (huge / "config.json").write_text(
        json.dumps(
            {
                **LLAMA2_7B_CONFIG,
                "num_hidden_layers": 80,
                "hidden_size": 8192,
                "num_attention_heads": 64,
                "num_key_value_heads": 8,
                "intermediate_size": 28672,
            }
        )
    )
    (huge / "pytorch_model.bin").write_bytes(b"0")
    home = root / "home"
    for src, alias in ((tiny, "smollm2-135m"), (huge, "llama-2-70b")):
        assert deploykit(home, "models", "import", str(src), "--alias", alias).returncode == 0
    return home


def test_unknown_model_lists_close_matches(home: Path) -> None:
    result = deploykit(home, "serve", "smolm2-135m", "--dry-run")
    assert_clean_failure(result, 3, "Unknown model 'smolm2-135m'", "Did you mean: smollm2-135m")


def test_dry_run_prints_the_plan_and_why(home: Path) -> None:
    result = deploykit(home, "serve", "--dry-run", "--engine-port", "8123")
    assert result.returncode == 0, result.stderr
    for text in ("VLLM_CPU_KVCACHE_SPACE", "--dtype", "float32", "vllm.entrypoints.openai.api_server", "--port 8123"):
        assert text in result.stdout


def test_dry_run_json_and_passthrough_flags(home: Path) -> None:
    result = deploykit(home, "serve", "smollm2-135m", "--dry-run", "--json", "--", "--dtype", "bfloat16")
    plan = json.loads(result.stdout)
    assert plan["argv"].count("--dtype") == 1 and plan["argv"][-2:] == ["--dtype", "bfloat16"]
    # the catalog's entry for this model carries its card's recommended sampling
    assert plan["argv"][plan["argv"].index("--override-generation-config") + 1] == '{"temperature":0.2,"top_p":0.9}'
    assert {"setting": "--dtype", "value": "(yours)"}.items() <= next(
        c for c in plan["choices"] if c["setting"] == "--dtype"
    ).items()


@pytest.mark.parametrize(("value", "says"), [("warm", "valid number"), ("-1", "greater than or equal to 0")])
def test_a_bad_loadtest_temperature_names_the_option(home: Path, value: str, says: str) -> None:
    result = deploykit(home, "loadtest", "run", "http://127.0.0.1:9", "--model", "m", "-c", "1", "--temperature", value)
    assert_clean_failure(result, 2, "temperature", says)


def test_engine_address_flags_are_refused(home: Path) -> None:
    assert_clean_failure(deploykit(home, "serve", "smollm2-135m", "--", "--port", "1"), 2, "--port")


def test_not_enough_ram_says_what_is_needed(home: Path) -> None:
    result = deploykit(home, "serve", "llama-2-70b", "--dry-run")
    assert_clean_failure(result, 4, "GiB of RAM", "available", "parameters")


def test_port_in_use_fails_fast(home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = deploykit(home, "serve", "smollm2-135m", "--port", str(taken.getsockname()[1]))
    assert_clean_failure(result, 4, "already in use", "--port")


def test_import_of_a_missing_path(home: Path) -> None:
    assert_clean_failure(deploykit(home, "models", "import", "/nope.gguf", "--alias", "x"), 7, "does not exist")


def test_unknown_flag_is_a_usage_error(home: Path) -> None:
    result = deploykit(home, "serve", "--no-such-flag")
    assert result.returncode == 2 and "No such option" in result.stderr


def test_models_list_json(home: Path) -> None:
    listed = json.loads(deploykit(home, "models", "list", "--json").stdout)
    assert sorted(m["alias"] for m in listed) == ["llama-2-70b", "smollm2-135m"]


def test_doctor_json_reports_this_machine(home: Path) -> None:
    result = deploykit(home, "doctor", "--json")
    report = json.loads(result.stdout)
    assert report["hardware"]["cpu_ids"] and report["models"] == ["llama-2-70b", "smollm2-135m"]
    assert result.returncode == (0 if report["ok"] else 1)


def test_chat_without_a_server(home: Path) -> None:
    result = deploykit(home, "chat", "--url", "http://127.0.0.1:9", "-p", "hi")
    assert_clean_failure(result, 6, "Cannot reach", "deploykit serve")


def test_doctor_reports_an_empty_store(tmp_path: Path) -> None:
    result = deploykit(tmp_path / "empty", "doctor", "--json")
    report = json.loads(result.stdout)
    assert report["models"] == [] and not report["ok"] and result.returncode == 1
    assert any("No models in the store" in p and "models import" in p for p in report["problems"])
    text = deploykit(tmp_path / "empty", "doctor")
    assert "Missing: No models in the store" in text.stdout


# README claims through the CLI


def test_the_gateway_flags_reach_the_gateway_plan(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEPLOYKIT_SPILL_API_KEY", "sk-test")
    result = deploykit(
        home,
        "serve",
        "smollm2-135m",
        "--dry-run",
        "--host",
        "0.0.0.0",
        "--max-body",
        "1000",
        "--max-tokens",
        "50",
        "--max-concurrent-streams",
        "4",
        "--spill",
        "smollm2-135m=gpt-4o-mini@https://api.openai.com/v1",
        "--spill-queue",
        "8",
        "--token-price",
        "smollm2-135m=0.02/0.08",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Gateway on http://0.0.0.0:8000: API keys required" in out
    assert "request body at most 1,000 B" in out and "max_tokens at most 50" in out
    assert "requests in flight at most 4 (fair between keys" in out
    assert "spill smollm2-135m -> gpt-4o-mini at https://api.openai.com/v1 past 8 queued" in out
    assert "smollm2-135m priced at $0.02 / $0.08 per million prompt / completion tokens" in out
    default = deploykit(home, "serve", "smollm2-135m", "--dry-run").stdout
    assert "API keys not required" in default and "request body at most 4,194,304 B" in default


def test_a_spill_to_a_model_not_served_or_without_a_key_is_refused(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEPLOYKIT_SPILL_API_KEY", raising=False)
    spill = ["--spill", "smollm2-135m=gpt-4o-mini@https://api.openai.com/v1"]
    assert_clean_failure(deploykit(home, "serve", "smollm2-135m", "--dry-run", *spill), 2, "DEPLOYKIT_SPILL_API_KEY")
    price = ["--token-price", "llama-2-7b=1/2"]
    assert_clean_failure(deploykit(home, "serve", "smollm2-135m", "--dry-run", *price), 2, "'llama-2-7b', which is not")
    assert_clean_failure(deploykit(home, "serve", "--dry-run", "--token-price", "x"), 2, "MODEL=IN/OUT")


def test_debug_shows_the_traceback_and_keeps_the_exit_code(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    quiet = deploykit(home, "serve", "no-such-model", "--dry-run")
    assert_clean_failure(quiet, 3, "Unknown model")
    monkeypatch.setenv("DEPLOYKIT_DEBUG", "1")
    env = {**os.environ, "DEPLOYKIT_HOME": str(home)}
    loud = subprocess.run([*CLI, "serve", "no-such-model", "--dry-run"], env=env, capture_output=True, text=True)
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "UnknownModelError" in loud.stderr


def test_models_search_show_and_rm(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    found = deploykit(home, "models", "search", "llama", "--task", "text-generation", "--license", "llama2")
    assert found.returncode == 0 and "llama-2-7b" in found.stdout and "mistral" not in found.stdout
    rows = json.loads(deploykit(home, "models", "search", "--max-params", "500m", "--json").stdout)
    assert rows and all(r["params"] <= 500e6 for r in rows) and "smollm2-135m" in {r["alias"] for r in rows}
    assert_clean_failure(deploykit(home, "models", "search", "zzz-nothing"), 1, "No catalog model matches")
    card = json.loads(deploykit(home, "models", "show", "llama-2-7b", "--offline", "--json").stdout)
    assert card["catalog"]["repo"] == "meta-llama/Llama-2-7b-hf"
    assert card["memory"][1] == {
        "dtype": "bfloat16",
        "weight_bytes": card["memory"][1]["weight_bytes"],
        "kv_bytes_per_token": 524_288,
    }
    shown = deploykit(home, "models", "show", "llama-2-7b", "--offline")
    assert shown.returncode == 0 and "32 layers, 32 attention / 32 KV heads of 128" in shown.stdout
    # rm: a model of its own in a home of its own
    mine = tmp_path / "mine"
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**LLAMA2_7B_CONFIG, "hidden_size": 64, "num_attention_heads": 4}))
    write_safetensors(src / "model.safetensors", {"w": [64, 64]})
    assert deploykit(mine, "models", "import", str(src), "--alias", "tiny").returncode == 0
    removed = deploykit(mine, "models", "rm", "tiny", "--json")
    assert json.loads(removed.stdout) == {"alias": "tiny", "freed_bytes": json.loads(removed.stdout)["freed_bytes"]}
    assert json.loads(removed.stdout)["freed_bytes"] > 64 * 64 * 4
    assert json.loads(deploykit(mine, "models", "list", "--json").stdout) == []
    assert_clean_failure(deploykit(mine, "models", "rm", "tiny"), 3, "Unknown model 'tiny'")


def test_size_on_this_cpu(home: Path) -> None:
    result = deploykit(home, "size", "smollm2-135m", "--rps", "0.5", "--gpus", "cpu", "--json", "--input-tokens", "64")
    assert result.returncode == 0, result.stderr
    [option] = json.loads(result.stdout)["options"]
    assert option["hardware"] == "cpu" and option["kv_cache_tokens_per_replica"] > 0 and option["usd_per_hour"] is None
    assert "measured" in option["label"]


def test_a_home_prices_file_overrides_the_shipped_price(tmp_path: Path) -> None:
    args = ("cost", "llama-3.1-8b-instruct", "--rps", "1", "--gpus", "l4", "--compare", "gpt-4o-mini", "--json")
    shipped = json.loads(deploykit(tmp_path / "a", *args).stdout)
    home = tmp_path / "b"
    home.mkdir()
    (home / "prices.toml").write_text(
        '[[service]]\nname = "gpt-4o-mini"\nprovider = "openai"\ninput_per_mtok = 1.5\noutput_per_mtok = 6.0\n'
    )
    mine = json.loads(deploykit(home, *args).stdout)

    def managed(report: dict) -> float:  # type: ignore[type-arg]
        [offer] = [m for m in report["managed"] if m["name"] == "gpt-4o-mini"]
        return float(offer["monthly_usd"])

    assert managed(mine) == pytest.approx(10 * managed(shipped), rel=1e-6)  # both prices ten times the shipped


@pytest.mark.parametrize("width", ["60", "80", "200"])
def test_search_never_cuts_an_alias_and_drops_columns_to_fit(
    home: Path, width: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", width)
    result = deploykit(home, "models", "search", "llama")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(len(line) <= int(width) for line in lines)
    for alias in ("llama-3.1-70b-instruct", "llama-2-7b-chat"):
        assert any(f"│ {alias} " in line for line in lines), alias
    assert ("licence" in result.stdout) == (width != "60") and ("where" in result.stdout) == (width == "200")


def test_fit_columns_keeps_the_first_and_the_order() -> None:
    from deploykit.cli.models import fit_columns

    columns = {"alias": ["alias", "a-very-long-alias"], "task": ["task", "x" * 30], "n": ["n", "1"]}
    assert fit_columns(columns, 10) == ["alias"]  # the first even when it alone overflows
    assert fit_columns(columns, 35) == ["alias", "n"]  # a wide column skipped, a narrow later one kept
    assert fit_columns(columns, 100) == ["alias", "task", "n"]
    assert fit_columns({"a": ["a"], "w": ["w", "y" * 90]}, 40, wraps="w") == ["a", "w"]  # a wrapping one fits in 30


def test_help_lists_every_command_without_importing_them() -> None:
    import subprocess as sp

    code = (
        "import sys; from deploykit.cli.main import app, COMMANDS; "
        "from typer.testing import CliRunner; r = CliRunner().invoke(app, ['--help']); "
        "assert r.exit_code == 0, r.output; assert all(name in r.output for name in COMMANDS); "
        "heavy = [m for m in ('fastapi', 'aiohttp', 'huggingface_hub', 'pydantic', 'deploykit.serve.runner') "
        "if m in sys.modules]; assert not heavy, heavy"
    )
    result = sp.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_help_joins_a_paragraphs_lines_and_keeps_the_examples_as_written() -> None:
    from deploykit.cli.main import _reflow

    doc = """Pull a model.

    Only what serving needs
    is fetched.

    Examples:

      deploykit pull a
      deploykit pull b
    """
    assert _reflow(doc) == (
        "Pull a model.\n\nOnly what serving needs is fetched.\n\nExamples:\n\n  deploykit pull a\n  deploykit pull b"
    )
    shown = subprocess.run(
        [*CLI, "serve-hub", "--help"], env={**os.environ, "COLUMNS": "80"}, capture_output=True, text=True
    )
    # the paragraph wraps at the terminal's width, not at the docstring's line ends
    assert "is served as its repo at the commit stored here, each file with its sha256" in shown.stdout
