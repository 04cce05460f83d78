"""`deploykit deploy compose`: a Docker compose project for one GPU server, from the launch plans `serve`
makes for that server's GPUs.

Each engine is a container of its own, started with the plan's vLLM flags on the plan's GPU group (its
tensor-parallel size); the gateway is `deploykit serve --engine NAME=URL` in front of them, keeping keys and
the ledger in PostgreSQL; a one-shot `pull` service fills the shared volume first. Prometheus scrapes the
gateway and every engine and evaluates infra/prometheus/alerts.yml; Grafana shows infra/grafana/deploykit.json.
An optional `loadtest` profile runs `deploykit loadtest` against the gateway from inside the project.

Secrets are not written into compose.yaml: they are generated once into `.env` (mode 0600) and kept when the
project is rendered again, so that a database volume made with one password is not locked out by the next.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from deploykit.core.errors import UsageError
from deploykit.core.settings import Settings
from deploykit.models.catalog import load_catalog
from deploykit.models.prices import load_prices
from deploykit.models.resolve import resolve
from deploykit.models.store import ModelStore
from deploykit.serve.deploy.machine import planned_machine
from deploykit.serve.plan import LaunchPlan
from deploykit.serve.runner import prepare

ENGINE_PORT = 8000  # inside each engine's container
POSTGRES_IMAGE = "postgres:16.6-bookworm"
PROMETHEUS_IMAGE = "prom/prometheus:v2.53.3"
GRAFANA_IMAGE = "grafana/grafana:11.3.1"
# In the container: the volume's store (DEPLOYKIT_HOME=/data/deploykit, as the Dockerfile sets it).
_STORE = "/data/deploykit/models"
_SECRETS = ("POSTGRES_PASSWORD", "DEPLOYKIT_METRICS_TOKEN", "GRAFANA_ADMIN_PASSWORD")


@dataclass(frozen=True)
class ComposeOptions:
    image: str = "deploykit"  # built from the repository's Dockerfile (vLLM's CUDA build)
    port: int = 8000  # the gateway's port on the host
    loadtest_concurrency: int = 16


def engine_service(plan: LaunchPlan, index: int, several: bool) -> str:
    """engine-llama-3-1-8b-instruct (or -1, -2... for replicas)."""
    name = re.sub(r"[^a-z0-9]+", "-", plan.served_name.lower()).strip("-")
    return f"engine-{name}" + (f"-{index + 1}" if several else "")


def container_argv(plan: LaunchPlan) -> list[str]:
    """The plan's `vllm serve` arguments as the engine's container runs them: the model from the volume's
    store, listening on every interface at ENGINE_PORT; every flag the plan chose, unchanged."""
    argv = list(plan.argv)
    start = argv.index("serve")
    args = [f"{_STORE}/{plan.served_name}", *argv[start + 2 :]]
    for flag, value in (("--host", "0.0.0.0"), ("--port", str(ENGINE_PORT))):
        args[args.index(flag) + 1] = value
    return ["serve", *args]


def render(plans: Sequence[LaunchPlan], options: ComposeOptions, env: Mapping[str, str]) -> dict[str, str]:
    """Every file of the project, by its path in the output folder. `env` holds the secrets (.env)."""
    if any(p.device != "gpu" for p in plans):
        raise UsageError(
            "deploy compose writes a project for a GPU server; these plans are for a CPU.",
            "Name the server's GPUs with --gpus (e.g. --gpus l4:1), or run `deploykit serve` on the CPU host.",
        )
    engines = _engines(plans)
    models = list(dict.fromkeys(p.served_name for p in plans))
    image = f"${{DEPLOYKIT_IMAGE:-{options.image}}}"
    services: dict[str, Any] = {
        "pull": {
            "image": image,
            "command": ["pull", *models],
            "environment": {"HF_TOKEN": "${HF_TOKEN:-}", "HF_ENDPOINT": "${HF_ENDPOINT:-https://huggingface.co}"},
            "volumes": ["data:/data"],
            "restart": "no",
        },
        **{name: _engine(plan, image) for name, plan in engines.items()},
        "postgres": {
            "image": POSTGRES_IMAGE,
            "environment": {
                "POSTGRES_USER": "deploykit",
                "POSTGRES_DB": "deploykit",
                "POSTGRES_PASSWORD": "${POSTGRES_PASSWORD:?set in .env}",
            },
            "volumes": ["postgres:/var/lib/postgresql/data"],
            "healthcheck": {
                "test": ["CMD", "pg_isready", "-U", "deploykit", "-d", "deploykit"],
                "interval": "5s",
                "timeout": "3s",
                "retries": 20,
            },
            "restart": "unless-stopped",
        },
        "gateway": {
            "image": image,
            "command": [
                "serve",
                "--host",
                "0.0.0.0",
                "--port",
                "8000",
                *(f"--engine={plan.served_name}=http://{name}:{ENGINE_PORT}" for name, plan in engines.items()),
            ],
            "environment": {
                "DEPLOYKIT_DATABASE_URL": (
                    "postgresql://deploykit:${POSTGRES_PASSWORD:?set in .env}@postgres:5432/deploykit"
                ),
                "DEPLOYKIT_METRICS_TOKEN": "${DEPLOYKIT_METRICS_TOKEN:?set in .env}",
            },
            "ports": [f"${{DEPLOYKIT_PORT:-{options.port}}}:8000"],
            "volumes": ["data:/data"],
            "depends_on": {"postgres": {"condition": "service_healthy"}},
            "stop_grace_period": "60s",  # SIGTERM drains in-flight requests first
            "restart": "unless-stopped",
        },
        "prometheus": {
            "image": PROMETHEUS_IMAGE,
            "command": ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.retention.time=30d"],
            "volumes": ["./prometheus:/etc/prometheus:ro", "prometheus:/prometheus"],
            "ports": ["9090:9090"],
            "depends_on": ["gateway"],
            "restart": "unless-stopped",
        },
        "grafana": {
            "image": GRAFANA_IMAGE,
            "environment": {
                "GF_SECURITY_ADMIN_PASSWORD": "${GRAFANA_ADMIN_PASSWORD:?set in .env}",
                "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH": "/var/lib/grafana/dashboards/deploykit.json",
            },
            "volumes": [
                "./grafana/provisioning:/etc/grafana/provisioning:ro",
                "./grafana/dashboards:/var/lib/grafana/dashboards:ro",
                "grafana:/var/lib/grafana",
            ],
            "ports": ["3000:3000"],
            "depends_on": ["prometheus"],
            "restart": "unless-stopped",
        },
        "loadtest": {
            "image": image,
            "profiles": ["loadtest"],
            "command": [
                "loadtest",
                "run",
                "http://gateway:8000",
                "--model",
                models[0],
                "-c",
                str(options.loadtest_concurrency),
                "--duration",
                "120",
                "--out",
                "/data/loadtests/run.json",
            ],
            "environment": {"OPENAI_API_KEY": "${DEPLOYKIT_API_KEY:?create a key and set DEPLOYKIT_API_KEY in .env}"},
            "volumes": ["data:/data"],
            "depends_on": ["gateway"],
        },
    }
    project = {
        "name": "deploykit",
        "services": services,
        "volumes": {"data": {}, "postgres": {}, "prometheus": {}, "grafana": {}},
    }
    header = (
        "# Written by `deploykit deploy compose`: "
        + " ".join(f"{p.served_name} (tp {_tp(p)}, GPUs {','.join(map(str, p.gpu_indices))})" for p in plans)
        + ".\n# Secrets are in .env. `docker compose up -d`, then `docker compose exec gateway deploykit keys create"
        " --name NAME`.\n"
    )
    return {
        "compose.yaml": header + _yaml(project),
        ".env": "".join(f"{k}={v}\n" for k, v in env.items()),
        "prometheus/prometheus.yml": _prometheus(engines),
        "prometheus/metrics_token": env["DEPLOYKIT_METRICS_TOKEN"] + "\n",
        "prometheus/alerts.yml": _infra("prometheus/alerts.yml"),
        "grafana/dashboards/deploykit.json": _infra("grafana/deploykit.json"),
        "grafana/provisioning/datasources/prometheus.yml": _yaml(
            {
                "apiVersion": 1,
                "datasources": [
                    {
                        "name": "Prometheus",
                        "uid": "prometheus",
                        "type": "prometheus",
                        "access": "proxy",
                        "url": "http://prometheus:9090",
                        "isDefault": True,
                    },
                ],
            }
        ),
        "grafana/provisioning/dashboards/deploykit.yml": _yaml(
            {
                "apiVersion": 1,
                "providers": [
                    {"name": "deploykit", "type": "file", "options": {"path": "/var/lib/grafana/dashboards"}}
                ],
            }
        ),
    }


def secrets_for(output: Path) -> dict[str, str]:
    """The project's .env: what an earlier render wrote (kept: the database volume knows that password),
    with any secret still missing generated now."""
    env: dict[str, str] = {}
    path = output / ".env"
    if path.exists():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not key.startswith("#"):
                env[key.strip()] = value.strip()
    for key in _SECRETS:
        env.setdefault(key, secrets.token_urlsafe(24))
    return env


def write_project(files: Mapping[str, str], output: Path, force: bool) -> None:
    """Write the files into `output` all at once: into a fresh folder beside it, then moved into place, so an
    interrupted write leaves the old project (or none), never half of one."""
    if output.exists() and any(output.iterdir()) and not force:
        raise UsageError(
            f"{output} exists and is not empty.", "Pass --force to render the project there again (.env is kept)."
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the mounted config from the containers' users
    try:
        for name, text in files.items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            # secrets readable by their owner only; the metrics token is read by Prometheus's own user
            path.chmod(0o600 if name == ".env" else 0o644)
        if output.exists():
            old = output.with_name(f".{output.name}-old-{os.getpid()}")
            output.rename(old)
            staging.rename(output)
            shutil.rmtree(old)
        else:
            staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _engines(plans: Sequence[LaunchPlan]) -> dict[str, LaunchPlan]:
    named: dict[str, LaunchPlan] = {}
    for plan in plans:
        mine = [p for p in plans if p.served_name == plan.served_name]
        named[engine_service(plan, sum(p.served_name == plan.served_name for p in named.values()), len(mine) > 1)] = (
            plan
        )
    return named


def _engine(plan: LaunchPlan, image: str) -> dict[str, Any]:
    env = {k: v for k, v in plan.env.items() if k != "CUDA_VISIBLE_DEVICES"}  # the reservation picks the GPUs
    return {
        "image": image,
        "entrypoint": ["vllm"],
        "command": container_argv(plan),
        **({"environment": env} if env else {}),
        "volumes": ["data:/data"],
        "ipc": "host",  # vLLM's tensor-parallel workers share memory through /dev/shm
        "depends_on": {"pull": {"condition": "service_completed_successfully"}},
        "healthcheck": {
            "test": [
                "CMD",
                "python",
                "-c",
                f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{ENGINE_PORT}/health')",
            ],
            "interval": "10s",
            "timeout": "3s",
            "retries": 3,
            "start_period": "900s",  # a cold start loads the weights and compiles for minutes
        },
        "deploy": {
            "resources": {
                "reservations": {
                    "devices": [
                        {"driver": "nvidia", "device_ids": [str(i) for i in plan.gpu_indices], "capabilities": ["gpu"]}
                    ]
                }
            }
        },
        "restart": "unless-stopped",
    }


def _prometheus(engines: Mapping[str, LaunchPlan]) -> str:
    config = {
        "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [
            {
                "job_name": "deploykit-gateway",
                "authorization": {"type": "Bearer", "credentials_file": "metrics_token"},
                "static_configs": [{"targets": ["gateway:8000"]}],
            },
            {
                "job_name": "vllm",
                "static_configs": [
                    {"targets": [f"{name}:{ENGINE_PORT}"], "labels": {"model": plan.served_name}}
                    for name, plan in engines.items()
                ],
            },
        ],
    }
    return "# Written by `deploykit deploy compose`.\n" + _yaml(config)


def _yaml(data: object) -> str:
    """Block style for mappings, flow style for the lists of scalars (commands read as one line)."""
    return str(yaml.safe_dump(data, sort_keys=False, width=120, default_flow_style=None))


def _infra(name: str) -> str:
    """A file of infra/ (installed with the package as deploykit.infra)."""
    text: str = (resources.files("deploykit.infra") / name).read_text()
    return text


def _tp(plan: LaunchPlan) -> int:
    return len(plan.gpu_indices)


def compose_project(
    settings: Settings,
    models: Sequence[str],
    *,
    gpus: str,
    output: Path,
    replicas: int = 1,
    force: bool = False,
    options: ComposeOptions | None = None,
) -> list[LaunchPlan]:
    """Plan MODELS on the named server's GPUs, render the project, and write it to `output` (returns the plans)."""
    prices = load_prices(settings.home / "prices.toml")
    store, catalog = ModelStore(settings.models_dir), load_catalog()
    for name in models:
        resolve(name, store, catalog).hub_repo()  # the pull service fetches it: it must have a hub repo
    plans = prepare(settings, models, replicas=replicas, hardware=planned_machine(gpus, prices), environ={})
    write_project(render(plans, options or ComposeOptions(), secrets_for(output)), output, force)
    return plans
