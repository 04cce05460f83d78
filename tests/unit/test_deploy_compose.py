"""`deploykit deploy compose`: the project it writes for a planned GPU server, checked against the compose
specification's JSON schema (check-jsonschema's copy) and Prometheus's own config checker (promtool), and
against the launch plans `serve` makes for the same GPUs: each engine's GPUs and flags are the plan's."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploykit.core.errors import NotFoundError, UsageError
from deploykit.core.settings import Settings
from deploykit.models.prices import load_prices
from deploykit.serve.deploy.compose import ComposeOptions, compose_project, render
from deploykit.serve.deploy.machine import planned_machine
from deploykit.serve.deploy.project import container_argv, write_project
from deploykit.serve.runner import prepare


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("DEPLOYKIT_HOME", str(tmp_path / "home"))
    return Settings()


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing: `make test` installs Debian's prometheus package")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


def _check(output: Path) -> dict[str, object]:
    """The project validates: compose.yaml against the compose spec, prometheus.yml and its rules with
    promtool. Returns compose.yaml, parsed."""
    schema = subprocess.run(
        [
            str(Path(sys.executable).with_name("check-jsonschema")),
            "--builtin-schema",
            "vendor.compose-spec",
            str(output / "compose.yaml"),
        ],
        capture_output=True,
        text=True,
    )
    assert schema.returncode == 0, schema.stdout + schema.stderr
    promtool = subprocess.run(
        [_promtool(), "check", "config", str(output / "prometheus" / "prometheus.yml")], capture_output=True, text=True
    )
    assert promtool.returncode == 0, promtool.stdout + promtool.stderr
    project: dict[str, object] = yaml.safe_load((output / "compose.yaml").read_text())
    return project


@pytest.mark.parametrize(
    ("models", "replicas", "groups"),
    [
        (["smollm2-135m"], 1, [[0]]),
        # 141 GB of bf16 weights and vLLM's runtime on each GPU (about 5.7 GiB with tensor parallelism) leave
        # two H100s no room for KV cache: four each, and two replicas take the eight GPUs four and four
        (["llama-3.1-70b-instruct"], 2, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ],
)
def test_a_project_for_an_eight_gpu_server_validates_and_follows_the_plans(
    settings: Settings, tmp_path: Path, models: list[str], replicas: int, groups: list[list[int]]
) -> None:
    output = tmp_path / "deploy"
    plans = compose_project(settings, models, gpus="h100-sxm:8", output=output, replicas=replicas)
    assert [list(p.gpu_indices) for p in plans] == groups
    project = _check(output)
    services: dict[str, dict[str, object]] = project["services"]  # type: ignore[assignment]
    engines = {name: s for name, s in services.items() if name.startswith("engine-")}
    machine = planned_machine("h100-sxm:8", load_prices())
    again = prepare(settings, models, replicas=replicas, hardware=machine, environ={})
    assert len(engines) == len(again)
    for (name, engine), plan in zip(engines.items(), again, strict=True):
        assert engine["command"] == container_argv(plan)
        args = engine["command"]
        assert args[args.index("--tensor-parallel-size") + 1] == str(len(plan.gpu_indices))  # type: ignore[union-attr,index]
        [device] = engine["deploy"]["resources"]["reservations"]["devices"]  # type: ignore[index]
        assert device["device_ids"] == [str(i) for i in plan.gpu_indices] and device["driver"] == "nvidia"
        assert f"--engine={plan.served_name}=http://{name}:8000" in services["gateway"]["command"]  # type: ignore[operator]
    # the plan's flags, each unchanged; only the model path, host and port are the container's
    assert container_argv(again[0])[:8] == [
        "serve",
        f"/data/deploykit/models/{models[0]}",
        "--served-model-name",
        models[0],
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
    ]
    assert container_argv(again[0])[8:] == list(again[0].argv[again[0].argv.index("--port") + 2 :])
    scraped = yaml.safe_load((output / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    assert [t for c in scraped[1]["static_configs"] for t in c["targets"]] == [f"{n}:8000" for n in engines]
    dashboard = json.loads((output / "grafana" / "dashboards" / "deploykit.json").read_text())
    assert dashboard["uid"] == "deploykit" and len(dashboard["panels"]) == 10
    # the load test's workers reach its master by service name and port, as many as it waits for
    master, worker = services["loadtest"]["command"], services["loadtest-worker"]["command"]
    port = master[master.index("--master-port") + 1]  # type: ignore[union-attr,index]
    assert worker == ["loadtest", "worker", f"loadtest:{port}"]
    processes = int(master[master.index("--processes") + 1])  # type: ignore[union-attr,index,call-overload]
    assert services["loadtest-worker"]["deploy"] == {"replicas": processes}
    assert services["loadtest"]["environment"] == services["loadtest-worker"]["environment"]  # each its own key


def test_secrets_live_in_env_only_and_survive_a_second_render(settings: Settings, tmp_path: Path) -> None:
    output = tmp_path / "deploy"
    compose_project(settings, ["smollm2-135m"], gpus="l4:1", output=output)
    env = (output / ".env").read_text()
    assert stat.S_IMODE((output / ".env").stat().st_mode) == 0o600
    secrets = dict(line.split("=", 1) for line in env.splitlines())
    assert set(secrets) == {"POSTGRES_PASSWORD", "DEPLOYKIT_METRICS_TOKEN", "GRAFANA_ADMIN_PASSWORD"}
    text = (output / "compose.yaml").read_text()
    assert not any(value in text for value in secrets.values())
    assert (output / "prometheus" / "metrics_token").read_text().strip() == secrets["DEPLOYKIT_METRICS_TOKEN"]
    with pytest.raises(UsageError, match="exists and is not empty"):
        compose_project(settings, ["smollm2-135m"], gpus="l4:1", output=output)
    (output / ".env").write_text(env + "HF_TOKEN=hf_mine\n")
    compose_project(settings, ["smollm2-135m"], gpus="l4:2", output=output, replicas=2, force=True)
    assert (output / ".env").read_text() == env + "HF_TOKEN=hf_mine\n"  # the database volume knows that password
    assert "engine-smollm2-135m-2" in (output / "compose.yaml").read_text()


def test_an_interrupted_write_leaves_the_old_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output = tmp_path / "deploy"
    write_project({"compose.yaml": "old\n"}, output, force=False)
    written: list[str] = []
    real = Path.write_text

    def fail_on_the_second(self: Path, text: str, *args: object, **kwargs: object) -> int:
        written.append(self.name)
        if len(written) == 2:
            raise OSError("disk full")
        return real(self, text)

    monkeypatch.setattr(Path, "write_text", fail_on_the_second)
    with pytest.raises(OSError, match="disk full"):
        write_project({"compose.yaml": "new\n", ".env": "A=1\n"}, output, force=True)
    assert (output / "compose.yaml").read_text() == "old\n" and not (output / ".env").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["deploy"]  # no half-written folder left beside it


def test_what_cannot_be_deployed_says_why(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is not GPU:COUNT"):
        compose_project(settings, ["smollm2-135m"], gpus="h100-sxm:eight", output=tmp_path / "a")
    with pytest.raises(NotFoundError, match="No GPU named 'h900'"):
        compose_project(settings, ["smollm2-135m"], gpus="h900:8", output=tmp_path / "a")
    with pytest.raises(UsageError, match="managed service"):
        compose_project(settings, ["gpt-4o-mini"], gpus="l4:1", output=tmp_path / "a")
    cpu = prepare(settings, ["smollm2-135m"], hardware=planned_machine("l4:1", load_prices()), environ={})
    cpu = [plan.__class__(**{**plan.__dict__, "device": "cpu"}) for plan in cpu]
    with pytest.raises(UsageError, match="for a GPU server"):
        render(cpu, ComposeOptions(), {"DEPLOYKIT_METRICS_TOKEN": "t"})
    assert not (tmp_path / "a").exists()


def test_gateway_options_reach_the_gateway_and_serve_takes_them(settings: Settings, tmp_path: Path) -> None:
    extra = ("--routing=prefix", "--token-price=smollm2-135m=0.1/0.4")
    options = ComposeOptions(gateway_args=extra)
    compose_project(settings, ["smollm2-135m"], gpus="l4:1", output=tmp_path / "deploy", options=options)
    command = yaml.safe_load((tmp_path / "deploy" / "compose.yaml").read_text())["services"]["gateway"]["command"]
    assert tuple(command[-2:]) == extra
    # the gateway's command line as `deploykit serve` reads it (the dry run checks every option, starts nothing)
    checked = subprocess.run(
        [sys.executable, "-m", "deploykit", *command, "--dry-run"],
        capture_output=True, text=True, env={**os.environ, "DEPLOYKIT_HOME": str(settings.home)}, timeout=120,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert "smollm2-135m priced at $0.1 / $0.4 per million" in checked.stdout + checked.stderr
    with pytest.raises(UsageError, match="'--lora-on-demand' is not an option of the gateway"):
        compose_project(
            settings, ["smollm2-135m"], gpus="l4:1", output=tmp_path / "b",
            options=ComposeOptions(gateway_args=("--lora-on-demand",)),
        )  # fmt: skip
    assert not (tmp_path / "b").exists()
