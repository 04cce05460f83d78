"""`deploykit deploy compose`: a Docker compose project for one GPU server, from the launch plans `serve`
makes for that server's GPUs.

Each engine is a container of its own, started with the plan's vLLM flags on the plan's GPU group (its
tensor-parallel size); the gateway is `deploykit serve --engine NAME=URL` in front of them, keeping keys and
the ledger in PostgreSQL; a one-shot `pull` service fills the shared volume first. Prometheus scrapes the
gateway and every engine and evaluates infra/prometheus/alerts.yml; Grafana shows infra/grafana/deploykit.json.
An optional `loadtest` profile runs `deploykit loadtest` against the gateway from inside the project: a master
and its workers (`loadtest worker`), which connect to it.

Secrets are not written into compose.yaml: they are generated once into `.env` (mode 0600) and kept when the
project is rendered again, so that a database volume made with one password is not locked out by the next.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploykit.core.errors import UsageError
from deploykit.core.settings import Settings
from deploykit.serve.deploy.project import (
    ENGINE_PORT,
    container_argv,
    container_env,
    engine_name,
    gateway_args,
    infra_file,
    plan_models,
    read_env,
    to_yaml,
    with_secrets,
    write_project,
)
from deploykit.serve.plan import LaunchPlan

POSTGRES_IMAGE = "postgres:16.6-bookworm"
PROMETHEUS_IMAGE = "prom/prometheus:v2.53.3"
GRAFANA_IMAGE = "grafana/grafana:11.3.1"
_LOCUST_PORT = 5557  # where the load test's workers reach its master
_API_KEY = "${DEPLOYKIT_API_KEY:?create a key and set DEPLOYKIT_API_KEY in .env}"


@dataclass(frozen=True)
class ComposeOptions:
    image: str = "deploykit"  # built from the repository's Dockerfile (vLLM's CUDA build)
    port: int = 8000  # the gateway's port on the host
    loadtest_concurrency: int = 16
    loadtest_workers: int = 2  # load-generator processes under the load test's master
    gateway_args: tuple[str, ...] = ()  # more `serve` options for the gateway (project.gateway_args checks them)


def render(plans: Sequence[LaunchPlan], options: ComposeOptions, env: Mapping[str, str]) -> dict[str, str]:
    """Every file of the project, by its path in the output folder. `env` holds the secrets (.env)."""
    if any(p.device != "gpu" for p in plans):
        raise UsageError(
            "deploy compose writes a project for a GPU server; these plans are for a CPU.",
            "Name the server's GPUs with --gpus (e.g. --gpus l4:1), or run `deploykit serve` on the CPU host.",
        )
    engines = engine_services(plans)
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
                *gateway_args(options.gateway_args),
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
        # the load test as locust runs it at scale: a master and its workers, which take the run from it
        "loadtest": {
            "image": image,
            "profiles": ["loadtest"],
            "command": [
                *("loadtest", "run", "http://gateway:8000", "--model", models[0]),
                *("-c", str(options.loadtest_concurrency), "--duration", "120"),
                *("--processes", str(options.loadtest_workers), "--master-port", str(_LOCUST_PORT)),
                *("--out", "/data/loadtests/run.json", "--html", "/data/loadtests/run.html"),
            ],
            "environment": {"OPENAI_API_KEY": _API_KEY},
            "volumes": ["data:/data"],
            "depends_on": ["gateway"],
        },
        "loadtest-worker": {
            "image": image,
            "profiles": ["loadtest"],
            "command": ["loadtest", "worker", f"loadtest:{_LOCUST_PORT}"],
            "environment": {"OPENAI_API_KEY": _API_KEY},  # each its own: no key crosses the wire
            "deploy": {"replicas": options.loadtest_workers},
            "depends_on": ["loadtest"],
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
        "compose.yaml": header + to_yaml(project),
        ".env": "".join(f"{k}={v}\n" for k, v in env.items()),
        "prometheus/prometheus.yml": _prometheus(engines),
        "prometheus/metrics_token": env["DEPLOYKIT_METRICS_TOKEN"] + "\n",
        "prometheus/alerts.yml": infra_file("prometheus/alerts.yml"),
        "grafana/dashboards/deploykit.json": infra_file("grafana/deploykit.json"),
        "grafana/provisioning/datasources/prometheus.yml": to_yaml(
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
        "grafana/provisioning/dashboards/deploykit.yml": to_yaml(
            {
                "apiVersion": 1,
                "providers": [
                    {"name": "deploykit", "type": "file", "options": {"path": "/var/lib/grafana/dashboards"}}
                ],
            }
        ),
    }


def engine_services(plans: Sequence[LaunchPlan]) -> dict[str, LaunchPlan]:
    """Each engine container's service name and plan: engine-MODEL, or engine-MODEL-1, -2... for replicas."""
    replicas, seen = Counter(p.served_name for p in plans), Counter[str]()
    named: dict[str, LaunchPlan] = {}
    for plan in plans:
        seen[plan.served_name] += 1
        several = f"-{seen[plan.served_name]}" if replicas[plan.served_name] > 1 else ""
        named[engine_name(plan.served_name) + several] = plan
    return named


def _engine(plan: LaunchPlan, image: str) -> dict[str, Any]:
    env = container_env(plan)
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
    return "# Written by `deploykit deploy compose`.\n" + to_yaml(config)


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
    plans = plan_models(settings, models, gpus, replicas)  # the replicas share the server's GPUs
    write_project(render(plans, options or ComposeOptions(), with_secrets(read_env(output / ".env"))), output, force)
    return plans
