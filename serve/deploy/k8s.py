"""`deploykit deploy k8s`: Kubernetes manifests for a cluster of GPU nodes, from the launch plans `serve` makes
for one node's GPUs (GPU:COUNT names the node type).

Per model: an engine Deployment (each pod requests the plan's tensor-parallel size of `nvidia.com/gpu`, runs
`vllm serve` with the plan's flags, and fills the shared model volume first with `deploykit pull` in an init
container), a Service in front of its pods, a PodDisruptionBudget, and a HorizontalPodAutoscaler on the
engines' queue (vLLM's `vllm:num_requests_waiting`, served to the HPA by the Prometheus adapter as
`vllm_num_requests_waiting`). The gateway
is a stateless Deployment of several replicas (`deploykit serve --engine MODEL=http://engine-MODEL:8000`)
with its own Service and budget; keys, the ledger and the keys' quotas are in PostgreSQL (a StatefulSet),
shared by every gateway pod. Monitoring, for clusters that run the Prometheus operator: ServiceMonitors, the
alert rules as a PrometheusRule, and the Grafana dashboard as a ConfigMap for Grafana's sidecar. A load test
runs inside the cluster as locust does at scale: a master Job and a Job of worker pods that connect to it.

The output folder is a Helm chart (infra/helm/deploykit, whose one template emits the manifests as written)
with the manifests in manifests/: `helm install` it, or `kubectl apply -f` its manifests/. Secrets go to
`manifests/secret.yaml` (mode 0600), generated once and kept when the manifests are rendered again.
"""

from __future__ import annotations

import base64
import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deploykit.core.settings import Settings
from deploykit.serve.deploy.project import (
    ENGINE_PORT,
    container_argv,
    container_env,
    engine_name,
    gateway_args,
    infra_file,
    plan_models,
    with_secrets,
    write_project,
)
from deploykit.serve.plan import LaunchPlan

_PART_OF = {"app.kubernetes.io/part-of": "deploykit"}
_LOCUST_PORT = 5557  # the load test's master, where its workers connect (locust's own default)
_CHART = ("Chart.yaml", "templates/manifests.yaml", "README.md")  # infra/helm/deploykit: emits manifests/


@dataclass(frozen=True)
class K8sOptions:
    image: str = "deploykit"  # built from the repository's Dockerfile and pushed where the cluster pulls
    gateway_replicas: int = 2
    storage_class: str | None = None  # for the model volume, which every engine pod mounts (ReadWriteMany)
    model_storage: str = "500Gi"
    max_engine_replicas: int = 4  # the autoscaler's ceiling per model
    queue_target: int = 8  # requests waiting per engine pod that the autoscaler aims at
    loadtest_workers: int = 4  # load-generator pods under the load test's master
    gateway_args: tuple[str, ...] = ()  # more `serve` options for the gateway (project.gateway_args checks them)


def render(plans: Sequence[LaunchPlan], options: K8sOptions, secrets: Mapping[str, str]) -> dict[str, str]:
    """Every manifest, by file name (under manifests/); each file holds the objects of one part of the
    deployment."""
    models = {p.served_name: p for p in plans}  # one Deployment per model: replicas are pods of it
    replicas = {name: sum(p.served_name == name for p in plans) for name in models}
    files = {
        "secret.yaml": _dump([_secret(secrets)]),
        "storage.yaml": _dump([_models_volume(options)]),
        "postgres.yaml": _dump(_postgres()),
        "gateway.yaml": _dump(_gateway(models, options)),
        "engines.yaml": _dump(
            [
                o
                for name, plan in models.items()
                for o in (_ray_engine if plan.nodes > 1 else _engine)(plan, replicas[name], options)
            ]
        ),
        "monitoring.yaml": _dump(_monitoring(models)),
        "loadtest.yaml": _dump(_loadtest(next(iter(models)), options)),
    }
    return {f"manifests/{name}": text for name, text in files.items()}


def k8s_project(
    settings: Settings,
    models: Sequence[str],
    *,
    gpus: str,
    output: Path,
    replicas: int = 1,
    force: bool = False,
    options: K8sOptions | None = None,
    nodes: int = 1,
) -> list[LaunchPlan]:
    """Plan each of MODELS on one node of the named GPUs (a model larger than that on up to `nodes` of them),
    render the manifests, and write them to `output`."""
    # each model's pods are scheduled on nodes of their own: each is planned on a whole node, not a share of one
    every = [plan for model in models for plan in plan_models(settings, [model], gpus, 1, nodes)]
    plans = [plan for plan in every for _ in range(replicas)]
    secrets = with_secrets(_read_secrets(output / "manifests" / "secret.yaml"))
    chart = {name: infra_file(f"helm/deploykit/{name}") for name in _CHART}
    files = {**chart, **render(plans, options or K8sOptions(), secrets)}
    write_project(files, output, force, private=("manifests/secret.yaml",))
    return plans


def _engine(plan: LaunchPlan, replicas: int, options: K8sOptions) -> list[dict[str, Any]]:
    name, tp = engine_name(plan.served_name), len(plan.gpu_indices)
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "engine", **_PART_OF}
    selector = {"app.kubernetes.io/name": name}
    env = [{"name": k, "value": v} for k, v in container_env(plan).items()]
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "initContainers": [_pull(plan, options)],
                    "containers": [
                        {
                            "name": "vllm",
                            "image": options.image,
                            "command": ["vllm"],
                            "args": container_argv(plan),
                            **({"env": env} if env else {}),
                            "ports": [{"name": "http", "containerPort": ENGINE_PORT}],
                            "resources": {"limits": {"nvidia.com/gpu": tp}, "requests": {"nvidia.com/gpu": tp}},
                            # a cold start loads the weights and compiles: up to 15 minutes before the first 200
                            "startupProbe": _health(failures=90),
                            "readinessProbe": _health(failures=3),
                            "livenessProbe": _health(failures=6),
                            "volumeMounts": [
                                {"name": "data", "mountPath": "/data"},
                                {"name": "shm", "mountPath": "/dev/shm"},  # tensor-parallel workers share memory
                            ],
                        }
                    ],
                    "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000},
                    "terminationGracePeriodSeconds": 60,
                    "volumes": [
                        {"name": "data", "persistentVolumeClaim": {"claimName": "deploykit-data"}},
                        {"name": "shm", "emptyDir": {"medium": "Memory"}},
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {"selector": selector, "ports": [{"name": "http", "port": ENGINE_PORT, "targetPort": "http"}]},
    }
    budget = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "labels": labels},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}},
    }
    autoscaler = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": replicas,
            "maxReplicas": max(replicas, options.max_engine_replicas),
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        # vLLM's vllm:num_requests_waiting, as the Prometheus adapter names it (docs/DEPLOY.md)
                        "metric": {"name": "vllm_num_requests_waiting"},
                        "target": {"type": "AverageValue", "averageValue": str(options.queue_target)},
                    },
                }
            ],
            # an engine takes minutes to start: scale up on a sustained queue, down slowly
            "behavior": {
                "scaleUp": {
                    "stabilizationWindowSeconds": 120,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}],
                },
                "scaleDown": {
                    "stabilizationWindowSeconds": 900,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 600}],
                },
            },
        },
    }
    return [deployment, service, budget, autoscaler]


def _ray_engine(plan: LaunchPlan, replicas: int, options: K8sOptions) -> list[dict[str, Any]]:
    """A model larger than one node: per replica a KubeRay RayCluster of `plan.nodes` pods, each asking for one
    node's GPUs; vLLM's pipeline stages run on them as Ray actors (the GPU image's vLLM brings Ray: its CUDA
    requirements do). KubeRay joins the Ray container's own command and arguments into one bash line that
    runs before its `ray start --block`, so the head's arguments start, in the background, a wait for the
    whole cluster's GPUs and then `vllm serve` (whose driver needs the head's GPUs too). A Service in front
    of the head pods; no autoscaler (a replica is several nodes at once)."""
    name, tp = engine_name(plan.served_name), len(plan.gpu_indices)
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "engine", **_PART_OF}
    worker_labels = {**labels, "app.kubernetes.io/name": f"{name}-ray-worker"}
    gpus = {"limits": {"nvidia.com/gpu": tp}, "requests": {"nvidia.com/gpu": tp}}
    mounts = [{"name": "data", "mountPath": "/data"}, {"name": "shm", "mountPath": "/dev/shm"}]
    volumes = [
        {"name": "data", "persistentVolumeClaim": {"claimName": "deploykit-data"}},
        {"name": "shm", "emptyDir": {"medium": "Memory"}},
    ]
    every_gpu = tp * plan.nodes
    wait = f"import ray, sys; ray.init(); sys.exit(ray.cluster_resources().get('GPU', 0) < {every_gpu})"
    start = (
        f'(until python -c "{wait}" >/dev/null 2>&1; do sleep 10; done; exec vllm {shlex.join(container_argv(plan))})'
        f' & echo "vllm serve starts once the Ray cluster has its {every_gpu} GPUs"'
    )
    env = [{"name": k, "value": v} for k, v in container_env(plan).items()]
    pod = {"securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000}, "volumes": volumes}
    head = {
        **pod,
        "initContainers": [_pull(plan, options)],
        "containers": [
            {
                "name": "ray-head",
                "image": options.image,
                "args": [start],  # KubeRay runs it in bash before its own `ray start --head --block`
                **({"env": env} if env else {}),
                "ports": [
                    {"name": "http", "containerPort": ENGINE_PORT},
                    {"name": "gcs", "containerPort": 6379},
                    {"name": "dashboard", "containerPort": 8265},
                ],
                "resources": gpus,
                # the whole cluster starts, then the weights load over every node: up to 30 minutes
                "startupProbe": _health(failures=180),
                "readinessProbe": _health(failures=3),
                "livenessProbe": _health(failures=6),
                "volumeMounts": mounts,
            }
        ],
    }
    worker = {
        **pod,
        "containers": [{"name": "ray-worker", "image": options.image, "resources": gpus, "volumeMounts": mounts}],
    }
    clusters = [
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayCluster",
            "metadata": {"name": f"{name}-{i + 1}" if replicas > 1 else name, "labels": labels},
            "spec": {
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": "0.0.0.0"},
                    "template": {"metadata": {"labels": labels}, "spec": head},
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "gpu-nodes",
                        "replicas": plan.nodes - 1,
                        "minReplicas": plan.nodes - 1,
                        "maxReplicas": plan.nodes - 1,
                        "rayStartParams": {},
                        "template": {"metadata": {"labels": worker_labels}, "spec": worker},
                    }
                ],
            },
        }
        for i in range(replicas)
    ]
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "selector": {"app.kubernetes.io/name": name},
            "ports": [{"name": "http", "port": ENGINE_PORT, "targetPort": "http"}],
        },
    }
    return [*clusters, service]


def _gateway(models: Mapping[str, LaunchPlan], options: K8sOptions) -> list[dict[str, Any]]:
    labels = {"app.kubernetes.io/name": "gateway", "app.kubernetes.io/component": "gateway", **_PART_OF}
    selector = {"app.kubernetes.io/name": "gateway"}
    engines = [f"--engine={m}=http://{engine_name(m)}:{ENGINE_PORT}" for m in models]
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "gateway", "labels": labels},
        "spec": {
            "replicas": options.gateway_replicas,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "gateway",
                            "image": options.image,
                            "args": [
                                "serve",
                                "--host",
                                "0.0.0.0",
                                "--port",
                                "8000",
                                *engines,
                                *gateway_args(options.gateway_args),
                            ],
                            "env": [
                                _from_secret("DEPLOYKIT_DATABASE_URL", "database-url"),
                                _from_secret("DEPLOYKIT_METRICS_TOKEN", "metrics-token"),
                            ],
                            "ports": [{"name": "http", "containerPort": 8000}],
                            "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5},
                            "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10},
                            "resources": {"requests": {"cpu": "1", "memory": "512Mi"}},
                        }
                    ],
                    "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "runAsNonRoot": True},
                    "terminationGracePeriodSeconds": 60,  # SIGTERM drains in-flight requests first
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "gateway", "labels": labels},
        "spec": {"selector": selector, "ports": [{"name": "http", "port": 8000, "targetPort": "http"}]},
    }
    budget = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "gateway", "labels": labels},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": selector}},
    }
    return [deployment, service, budget]


def _postgres() -> list[dict[str, Any]]:
    labels = {"app.kubernetes.io/name": "postgres", "app.kubernetes.io/component": "database", **_PART_OF}
    selector = {"app.kubernetes.io/name": "postgres"}
    ready = {"exec": {"command": ["pg_isready", "-U", "deploykit", "-d", "deploykit"]}, "periodSeconds": 5}
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "postgres", "labels": labels},
        "spec": {
            "serviceName": "postgres",
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "postgres",
                            "image": "postgres:16.6-bookworm",
                            "env": [
                                {"name": "POSTGRES_USER", "value": "deploykit"},
                                {"name": "POSTGRES_DB", "value": "deploykit"},
                                _from_secret("POSTGRES_PASSWORD", "postgres-password"),
                                {"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"},
                            ],
                            "ports": [{"name": "postgres", "containerPort": 5432}],
                            "readinessProbe": ready,
                            "volumeMounts": [{"name": "postgres", "mountPath": "/var/lib/postgresql/data"}],
                        }
                    ]
                },
            },
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "postgres"},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "20Gi"}}},
                }
            ],
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "postgres", "labels": labels},
        "spec": {"selector": selector, "ports": [{"name": "postgres", "port": 5432, "targetPort": "postgres"}]},
    }
    return [statefulset, service]


def _models_volume(options: K8sOptions) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteMany"],  # every engine pod, on any node, reads the same weights and cache
        "resources": {"requests": {"storage": options.model_storage}},
    }
    if options.storage_class:
        spec["storageClassName"] = options.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "deploykit-data", "labels": dict(_PART_OF)},
        "spec": spec,
    }


def _secret(secrets: Mapping[str, str]) -> dict[str, Any]:
    password = secrets["POSTGRES_PASSWORD"]
    data = {
        "postgres-password": password,
        "database-url": f"postgresql://deploykit:{password}@postgres:5432/deploykit",
        "metrics-token": secrets["DEPLOYKIT_METRICS_TOKEN"],
        "grafana-admin-password": secrets["GRAFANA_ADMIN_PASSWORD"],
    }
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "deploykit", "labels": dict(_PART_OF)},
        "type": "Opaque",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def _read_secrets(path: Path) -> dict[str, str]:
    """The secrets an earlier render wrote (the database was created with that password)."""
    if not path.exists():
        return {}
    [secret] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    names = {"postgres-password": "POSTGRES_PASSWORD", "metrics-token": "DEPLOYKIT_METRICS_TOKEN"}
    names["grafana-admin-password"] = "GRAFANA_ADMIN_PASSWORD"
    return {names[k]: v for k, v in data.items() if k in names}


def _monitoring(models: Mapping[str, LaunchPlan]) -> list[dict[str, Any]]:
    gateway = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "deploykit-gateway", "labels": dict(_PART_OF)},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/component": "gateway", **_PART_OF}},
            "endpoints": [
                {
                    "port": "http",
                    "path": "/metrics",
                    "interval": "15s",
                    "authorization": {"type": "Bearer", "credentials": {"name": "deploykit", "key": "metrics-token"}},
                    # the job the dashboard and the alert rules select on, as in the compose project
                    "relabelings": [{"targetLabel": "job", "replacement": "deploykit-gateway"}],
                }
            ],
        },
    }
    engines = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "deploykit-engines", "labels": dict(_PART_OF)},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/component": "engine", **_PART_OF}},
            "endpoints": [
                {
                    "port": "http",
                    "path": "/metrics",
                    "interval": "15s",
                    "relabelings": [{"targetLabel": "job", "replacement": "vllm"}],
                }
            ],
        },
    }
    rules = yaml.safe_load(infra_file("prometheus/alerts.yml"))
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "deploykit", "labels": dict(_PART_OF)},
        "spec": rules,
    }
    dashboard = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "deploykit-dashboard", "labels": {"grafana_dashboard": "1", **_PART_OF}},
        "data": {"deploykit.json": json.dumps(json.loads(infra_file("grafana/deploykit.json")))},
    }
    return [gateway, engines, rule, dashboard]


def _loadtest(model: str, options: K8sOptions) -> list[dict[str, Any]]:
    """A load test inside the cluster: a master Job (`loadtest run --master-port`), its Service, and a Job of
    worker pods (`loadtest worker`) that connect to it; the master merges their records into one report, kept
    on a volume of its own (the summary is also in the master's log, as JSON)."""
    labels = {"app.kubernetes.io/name": "loadtest-master", "app.kubernetes.io/component": "loadtest", **_PART_OF}
    workers = options.loadtest_workers
    # a key from `deploykit keys create`: kubectl create secret generic deploykit-loadtest --from-literal=key=dk-...
    key = {"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "deploykit-loadtest", "key": "key"}}}
    run = [
        *("loadtest", "run", "http://gateway:8000", "--model", model, "-c", str(16 * workers), "--duration", "120"),
        *("--processes", str(workers), "--master-port", str(_LOCUST_PORT)),
        *("--out", "/results/run.json", "--html", "/results/run.html", "--json"),
    ]
    master = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "deploykit-loadtest-master", "labels": dict(_PART_OF)},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "master",
                            "image": options.image,
                            "args": run,
                            "env": [key],
                            "ports": [{"name": "locust", "containerPort": _LOCUST_PORT}],
                            "volumeMounts": [{"name": "results", "mountPath": "/results"}],
                            "resources": {"requests": {"cpu": "1", "memory": "2Gi"}},
                        }
                    ],
                    "volumes": [
                        {"name": "results", "persistentVolumeClaim": {"claimName": "deploykit-loadtest-results"}}
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "loadtest-master", "labels": dict(labels)},
        "spec": {"selector": labels, "ports": [{"name": "locust", "port": _LOCUST_PORT, "targetPort": "locust"}]},
    }
    worker_labels = {**labels, "app.kubernetes.io/name": "loadtest-worker"}
    worker = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "deploykit-loadtest-workers", "labels": dict(_PART_OF)},
        "spec": {
            "parallelism": workers,
            "completions": workers,
            "backoffLimit": workers,
            "template": {
                "metadata": {"labels": worker_labels},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "worker",
                            "image": options.image,
                            "args": ["loadtest", "worker", f"loadtest-master:{_LOCUST_PORT}"],
                            "env": [key],
                            "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
                        }
                    ],
                },
            },
        },
    }
    results = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "deploykit-loadtest-results", "labels": dict(_PART_OF)},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    return [results, master, service, worker]


def _pull(plan: LaunchPlan, options: K8sOptions) -> dict[str, Any]:
    """The init container that fills the shared model volume: `deploykit pull` (a no-op once the weights are)."""
    return {
        "name": "pull",
        "image": options.image,
        "args": ["pull", plan.served_name],
        "env": [_from_secret("HF_TOKEN", "hf-token", optional=True)],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }


def _health(failures: int) -> dict[str, Any]:
    """GET /health every 10 s; `failures` in a row fail the probe."""
    return {
        "httpGet": {"path": "/health", "port": "http"},
        "periodSeconds": 10,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def _from_secret(name: str, key: str, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": "deploykit", "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


class _Plain(yaml.SafeDumper):  # type: ignore[misc]
    """A part used in two places is written twice: no YAML anchors, which some tools read badly."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _dump(objects: Sequence[Mapping[str, Any]]) -> str:
    header = "# Written by `deploykit deploy k8s`.\n"
    return header + "---\n".join(yaml.dump(dict(o), Dumper=_Plain, sort_keys=False, width=120) for o in objects)
