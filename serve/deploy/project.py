"""What every deployment project shares: the engine container's command from a launch plan, the secrets
(generated once, kept across renders), the files of infra/, YAML, and writing the folder all at once."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

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
# `deploykit serve` options that shape the gateway alone, and so may be passed to a project's gateway
# (--gateway-arg); the engines' own options come from their launch plans.
GATEWAY_FLAGS = frozenset(
    {
        "--body-timeout", "--drain-timeout", "--header-timeout", "--idle-timeout", "--max-body",
        "--max-concurrent-streams", "--max-connections", "--max-header-bytes", "--max-tokens", "--queue-timeout",
        "--routing", "--spill", "--spill-queue", "--spill-ttft", "--token-price", "--workers",
    }
)  # fmt: skip
# In the container: the volume's store (DEPLOYKIT_HOME=/data/deploykit, as the Dockerfile sets it).
_STORE = "/data/deploykit/models"
SECRETS = ("POSTGRES_PASSWORD", "DEPLOYKIT_METRICS_TOKEN", "GRAFANA_ADMIN_PASSWORD")


def engine_name(model: str) -> str:
    """engine-llama-3-1-8b-instruct: a model's engines as a service name (DNS label characters only)."""
    return "engine-" + re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")


def container_env(plan: LaunchPlan) -> dict[str, str]:
    """The plan's environment for the engine's container: without CUDA_VISIBLE_DEVICES, since the
    container's GPU reservation (or request) picks the GPUs it sees."""
    return {k: v for k, v in plan.env.items() if k != "CUDA_VISIBLE_DEVICES"}


def container_argv(plan: LaunchPlan) -> list[str]:
    """The plan's `vllm serve` arguments as the engine's container runs them: the model from the volume's
    store, listening on every interface at ENGINE_PORT; every flag the plan chose, unchanged."""
    argv = list(plan.argv)
    start = argv.index("serve")
    args = [f"{_STORE}/{plan.served_name}", *argv[start + 2 :]]
    for flag, value in (("--host", "0.0.0.0"), ("--port", str(ENGINE_PORT))):
        args[args.index(flag) + 1] = value
    return ["serve", *args]


def gateway_args(args: Sequence[str]) -> tuple[str, ...]:
    """The project gateway's extra `serve` options, each as --flag=value (or a bare --flag), checked by name."""
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag not in GATEWAY_FLAGS:
            raise UsageError(
                f"--gateway-arg {arg!r} is not an option of the gateway.",
                f"Pass one of {', '.join(sorted(GATEWAY_FLAGS))} as --flag=value, e.g. --gateway-arg "
                "--routing=prefix; the engines' options come from their launch plans.",
            )
    return tuple(args)


def plan_models(
    settings: Settings, models: Sequence[str], gpus: str, replicas: int, nodes: int = 1
) -> list[LaunchPlan]:
    """The launch plans `serve` would make for MODELS (`replicas` of each) on a machine with the GPUs named
    GPU:COUNT (a model larger than that spanning up to `nodes` of them). Each model must have a hub repo: the
    deployment pulls it there."""
    prices = load_prices(settings.home / "prices.toml")
    store, catalog = ModelStore(settings.models_dir), load_catalog()
    for name in models:
        resolve(name, store, catalog).hub_repo()
    hardware = planned_machine(gpus, prices)
    return prepare(settings, models, replicas=replicas, hardware=hardware, environ={}, nodes=nodes)


def with_secrets(existing: Mapping[str, str]) -> dict[str, str]:
    """`existing` (what an earlier render wrote: kept, since the database volume knows that password), with
    any secret still missing generated now."""
    return {**{key: secrets.token_urlsafe(24) for key in SECRETS}, **existing}


def read_env(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a .env file (none when it does not exist)."""
    env: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not key.startswith("#"):
                env[key.strip()] = value.strip()
    return env


def write_project(files: Mapping[str, str], output: Path, force: bool, private: tuple[str, ...] = (".env",)) -> None:
    """Write the files into `output` all at once: into a fresh folder beside it, then moved into place, so an
    interrupted write leaves the old project (or none), never half of one."""
    if output.exists() and any(output.iterdir()) and not force:
        raise UsageError(
            f"{output} exists and is not empty.",
            "Pass --force to render the project there again (its secrets are kept).",
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
            path.chmod(0o600 if name in private else 0o644)
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


def to_yaml(data: object) -> str:
    """Block style for mappings, flow style for the lists of scalars (commands read as one line)."""
    return str(yaml.safe_dump(data, sort_keys=False, width=120, default_flow_style=None))


def infra_file(name: str) -> str:
    """A file of infra/ (installed with the package as deploykit.infra)."""
    text: str = (resources.files("deploykit.infra") / name).read_text()
    return text
