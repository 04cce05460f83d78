"""`deploykit deploy`: project files for running the kit beyond one `deploykit serve` process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from deploykit.cli.console import err, out, print_json
from deploykit.cli.options import JsonOpt
from deploykit.core.settings import Settings
from deploykit.serve.deploy.compose import ComposeOptions, compose_project, engine_services
from deploykit.serve.deploy.k8s import K8sOptions, k8s_project
from deploykit.serve.deploy.project import engine_name

app = typer.Typer(
    help="Write deployment projects (Docker compose, Kubernetes) from the launch plans `serve` makes.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def deploy() -> None:
    """Write deployment projects (Docker compose, Kubernetes) from the launch plans `serve` makes."""


GatewayArgOpt = typer.Option(
    [],
    "--gateway-arg",
    help="A `deploykit serve` option for the gateway, as --flag=value (repeat for more), e.g. "
    "--gateway-arg --routing=prefix --gateway-arg --token-price=MODEL=0.1/0.4.",
)


@app.command("compose")
def compose(
    models: list[str] = typer.Argument(..., help="Catalog aliases or hub repo ids to serve."),
    gpus: str = typer.Option(..., help="The server's GPUs as GPU:COUNT, e.g. h100-sxm:8 (names as in `size`)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write the project into."),
    replicas: int = typer.Option(1, help="Engines per model, each on its own GPU group."),
    image: str = typer.Option("deploykit", help="The image built from the Dockerfile (DEPLOYKIT_IMAGE overrides)."),
    port: int = typer.Option(8000, help="The gateway's port on the host."),
    force: bool = typer.Option(False, "--force", help="Render into a folder that is not empty (.env is kept)."),
    gateway_arg: list[str] = GatewayArgOpt,
    json_: JsonOpt = False,
) -> None:
    """Write a compose project for one GPU server: an engine container per replica on the GPUs its plan
    names, the gateway in front (keys and ledger in PostgreSQL), Prometheus with alert rules, Grafana with
    a dashboard, and a `loadtest` profile.

    Examples:

      deploykit deploy compose llama-3.1-70b-instruct --gpus h100-sxm:8 --replicas 2 -o deploy/

      deploykit deploy compose smollm2-135m all-minilm-l6-v2 --gpus l4:2 -o deploy/
    """
    plans = compose_project(
        Settings(), models, gpus=gpus, output=output, replicas=replicas, force=force,
        options=ComposeOptions(image=image, port=port, gateway_args=tuple(gateway_arg)),
    )  # fmt: skip
    engines = [
        {"service": name, "model": p.served_name, "gpus": list(p.gpu_indices)}
        for name, p in engine_services(plans).items()
    ]
    if json_:
        print_json({"output": str(output), "engines": engines})
        return
    for e in engines:
        out.print(f"{e['service']}: {e['model']} on GPUs {','.join(map(str, e['gpus']))}", highlight=False)
    err.print(f"Wrote {output}/compose.yaml (secrets in {output}/.env).", highlight=False)
    err.print(
        f"Next: docker build -t {image} . && cd {output} && docker compose up -d; then "
        "docker compose exec gateway deploykit keys create --name NAME",
        highlight=False,
        markup=False,
    )


@app.command("k8s")
def k8s(
    models: list[str] = typer.Argument(..., help="Catalog aliases or hub repo ids to serve."),
    gpus: str = typer.Option(..., help="One node's GPUs as GPU:COUNT, e.g. h100-sxm:8 (names as in `size`)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write the manifests into."),
    replicas: int = typer.Option(1, help="Engine pods per model to start with (the autoscaler adds more)."),
    nodes: int = typer.Option(
        1,
        min=1,
        help="Nodes one replica of a model larger than one node may span: a KubeRay RayCluster of that many "
        "pods, tensor parallel within each node and a pipeline stage per node.",
    ),
    image: str = typer.Option("deploykit", help="The image built from the Dockerfile, as the cluster pulls it."),
    gateway_replicas: int = typer.Option(2, help="Gateway pods (stateless; quotas are shared in PostgreSQL)."),
    storage_class: str | None = typer.Option(None, help="Storage class of the model volume (ReadWriteMany)."),
    force: bool = typer.Option(False, "--force", help="Render into a folder that is not empty (secrets are kept)."),
    gateway_arg: list[str] = GatewayArgOpt,
    json_: JsonOpt = False,
) -> None:
    """Write Kubernetes manifests: an engine Deployment per model (GPUs per pod from its plan, weights
    pulled into a shared volume by an init container, probes sized for slow starts, an autoscaler on its
    queue), the gateway, PostgreSQL, monitoring for the Prometheus operator, and a load test (a locust master
    Job and a Job of workers). A model larger than one node runs on a KubeRay RayCluster of --nodes pods.

    Examples:

      deploykit deploy k8s llama-3.1-70b-instruct --gpus h100-sxm:8 --replicas 2 -o k8s/

      deploykit deploy k8s llama-3.1-405b-instruct --gpus h100-sxm:8 --nodes 2 -o k8s/   # needs KubeRay

      helm install llm k8s/     # or: kubectl apply -f k8s/manifests/
    """
    options = K8sOptions(
        image=image, gateway_replicas=gateway_replicas, storage_class=storage_class, gateway_args=tuple(gateway_arg)
    )
    plans = k8s_project(
        Settings(), models, gpus=gpus, output=output, replicas=replicas, force=force, options=options, nodes=nodes
    )
    engines: list[dict[str, Any]] = [
        {
            "deployment": engine_name(p.served_name),
            "model": p.served_name,
            "gpus_per_pod": len(p.gpu_indices),
            "pods": replicas * p.nodes,
            "nodes_per_replica": p.nodes,
        }
        for p in plans[::replicas]
    ]
    if json_:
        print_json({"output": str(output), "engines": engines})
        return
    for e in engines:
        ray = f" (Ray clusters of {e['nodes_per_replica']} nodes)" if e["nodes_per_replica"] > 1 else ""
        out.print(
            f"{e['deployment']}: {e['model']}, {e['pods']} pod(s) of {e['gpus_per_pod']} GPU(s){ray}", highlight=False
        )
    err.print(
        f"Wrote the chart {output}/ (secrets in {output}/manifests/secret.yaml). Next: helm install NAME {output}/ "
        f"or kubectl apply -f {output}/manifests/",
        highlight=False,
        markup=False,
    )
