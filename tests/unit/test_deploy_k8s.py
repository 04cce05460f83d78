"""`deploykit deploy k8s`: the manifests it writes, validated against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict), the alert rules of its PrometheusRule checked by promtool, and the objects
checked against each other and against the launch plans: each engine pod asks for its plan's GPUs and runs
its plan's flags, every Service, budget, autoscaler and ServiceMonitor selects pods or ports that exist, and
the gateway names every engine Service. (No Helm renderer installs here: docs/DEPLOY.md.)"""

from __future__ import annotations

import base64
import json
import shlex
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploykit.core.errors import NotEnoughMemoryError, UsageError
from deploykit.core.settings import Settings
from deploykit.models.prices import load_prices
from deploykit.serve.deploy.k8s import K8sOptions, k8s_project
from deploykit.serve.deploy.machine import planned_machine
from deploykit.serve.deploy.project import container_argv, engine_name, infra_file
from deploykit.serve.runner import prepare
from tests.unit.test_deploy_compose import _promtool


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("DEPLOYKIT_HOME", str(tmp_path / "home"))
    return Settings()


def _objects(output: Path) -> list[dict[str, Any]]:
    return [o for f in sorted((output / "manifests").glob("*.yaml")) for o in yaml.safe_load_all(f.read_text()) if o]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize(
    ("models", "groups"), [(["smollm2-135m"], [1]), (["llama-3.1-70b-instruct", "smollm2-135m"], [4, 1])]
)
def test_manifests_validate_and_hold_together(
    settings: Settings, tmp_path: Path, models: list[str], groups: list[int]
) -> None:
    output = tmp_path / "k8s"
    plans = k8s_project(settings, models, gpus="h100-sxm:8", output=output, replicas=2)
    validator = Path(sys.executable).with_name("kubernetes-validate")
    checked = subprocess.run(
        [str(validator), "--strict", *map(str, sorted((output / "manifests").glob("*.yaml")))],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # only the Prometheus operator's kinds have no schema in Kubernetes' own: they are checked below
    unknown = {
        line.split("kind ")[1].split(" ")[0] for line in checked.stdout.splitlines() if "Couldn't find schema" in line
    }
    assert unknown <= {"ServiceMonitor", "PrometheusRule"}

    objects = _objects(output)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for o in objects:
        by_kind.setdefault(o["kind"], []).append(o)
    deployments = {d["metadata"]["name"]: d for d in by_kind["Deployment"]}
    node = planned_machine("h100-sxm:8", load_prices())
    again = [p for m in models for p in prepare(settings, [m], hardware=node, environ={})]  # a whole node each
    for plan, gpus in zip(again, groups, strict=True):
        engine = deployments[engine_name(plan.served_name)]
        assert engine["spec"]["replicas"] == 2
        pod = engine["spec"]["template"]["spec"]
        [vllm] = pod["containers"]
        assert vllm["args"] == container_argv(plan) and vllm["command"] == ["vllm"]
        assert vllm["resources"]["limits"]["nvidia.com/gpu"] == gpus == len(plan.gpu_indices)
        startup = vllm["startupProbe"]
        assert startup["failureThreshold"] * startup["periodSeconds"] >= 900  # a cold start's 15 minutes
        [pull] = pod["initContainers"]
        assert pull["args"] == ["pull", plan.served_name]
        assert [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v] == [
            "deploykit-data"
        ]
    gateway_args = deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]["args"]
    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    for m in models:
        assert f"--engine={m}=http://{engine_name(m)}:8000" in gateway_args and engine_name(m) in services
    pods = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in deployments.items()}
    pods["postgres"] = by_kind["StatefulSet"][0]["spec"]["template"]["metadata"]["labels"]
    for job in by_kind["Job"]:  # the load test's master and workers: pods named by their label
        labels = job["spec"]["template"]["metadata"]["labels"]
        pods[labels["app.kubernetes.io/name"]] = labels
    for service in services.values():
        [target] = [n for n, labels in pods.items() if _matches(service["spec"]["selector"], labels)]
        assert service["metadata"]["name"] == target
    for budget in by_kind["PodDisruptionBudget"]:
        assert any(_matches(budget["spec"]["selector"]["matchLabels"], labels) for labels in pods.values())
    for autoscaler in by_kind["HorizontalPodAutoscaler"]:
        assert autoscaler["spec"]["scaleTargetRef"]["name"] in deployments
    for monitor in by_kind["ServiceMonitor"]:
        watched = [
            s
            for s in services.values()
            if _matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert watched and all(any(p["name"] == "http" for p in s["spec"]["ports"]) for s in watched)
    # the load test: workers connect to the master's Service and port, as many as it waits for
    jobs_by_name = {j["metadata"]["name"]: j for j in by_kind["Job"]}
    master, workers = jobs_by_name["deploykit-loadtest-master"], jobs_by_name["deploykit-loadtest-workers"]
    [run] = master["spec"]["template"]["spec"]["containers"]
    [work] = workers["spec"]["template"]["spec"]["containers"]
    assert run["args"][:4] == ["loadtest", "run", "http://gateway:8000", "--model"] and run["args"][4] == models[0]
    port = int(run["args"][run["args"].index("--master-port") + 1])
    assert work["args"] == ["loadtest", "worker", f"loadtest-master:{port}"]
    assert services["loadtest-master"]["spec"]["ports"][0]["port"] == port == run["ports"][0]["containerPort"]
    processes = int(run["args"][run["args"].index("--processes") + 1])
    assert workers["spec"]["parallelism"] == workers["spec"]["completions"] == processes
    assert run["env"] == work["env"]  # each takes the key from the secret: none crosses the wire
    claims = {c["metadata"]["name"] for c in by_kind["PersistentVolumeClaim"]}
    assert master["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] in claims
    jobs = {m["spec"]["endpoints"][0]["relabelings"][0]["replacement"] for m in by_kind["ServiceMonitor"]}
    assert jobs == {"deploykit-gateway", "vllm"}  # the jobs the dashboard and the rules select on

    [rule] = by_kind["PrometheusRule"]
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(rule["spec"]))
    promtool = subprocess.run([_promtool(), "check", "rules", str(rules)], capture_output=True, text=True)
    assert promtool.returncode == 0 and "SUCCESS: 8 rules found" in promtool.stdout, promtool.stdout + promtool.stderr
    [dashboard] = by_kind["ConfigMap"]
    assert json.loads(dashboard["data"]["deploykit.json"]) == json.loads(infra_file("grafana/deploykit.json"))
    assert len(plans) == 2 * len(models)


def test_secrets_are_generated_once_private_and_kept(settings: Settings, tmp_path: Path) -> None:
    output = tmp_path / "k8s"
    k8s_project(settings, ["smollm2-135m"], gpus="l4:1", output=output)
    path = output / "manifests" / "secret.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    [secret] = [o for o in yaml.safe_load_all(path.read_text()) if o]
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data["database-url"] == f"postgresql://deploykit:{data['postgres-password']}@postgres:5432/deploykit"
    assert not any(v in (output / "manifests" / "gateway.yaml").read_text() for v in data.values())
    k8s_project(settings, ["smollm2-135m"], gpus="l4:2", output=output, replicas=2, force=True)
    assert [o for o in yaml.safe_load_all(path.read_text()) if o] == [secret]  # the database knows that password


def test_a_model_larger_than_one_node_runs_on_a_ray_cluster(settings: Settings, tmp_path: Path) -> None:
    """Llama 3.1 405B in 16 bits (756 GiB of weights) does not fit 8 x H100: with --nodes 2 each replica is a
    KubeRay RayCluster of two 8-GPU pods, tensor parallel within a node and a pipeline stage per node."""
    with pytest.raises(NotEnoughMemoryError, match="does not fit") as refused:
        k8s_project(settings, ["llama-3.1-405b-instruct"], gpus="h100-sxm:8", output=tmp_path / "one")
    assert "--nodes N" in str(refused.value.hint)
    output = tmp_path / "k8s"
    [plan, _] = k8s_project(settings, ["llama-3.1-405b-instruct"], gpus="h100-sxm:8", output=output, replicas=2,
                            nodes=2)  # fmt: skip
    assert plan.nodes == 2 and len(plan.gpu_indices) == 8
    flags = " ".join(plan.argv)
    assert "--tensor-parallel-size 8 --pipeline-parallel-size 2 --distributed-executor-backend ray" in flags
    validator = str(Path(sys.executable).with_name("kubernetes-validate"))
    manifests = sorted((output / "manifests").glob("*.yaml"))
    checked = subprocess.run([validator, "--strict", *map(str, manifests)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    unknown = {line.split("kind ")[1].split(" ")[0] for line in checked.stdout.splitlines() if "Couldn't find" in line}
    assert unknown == {"ServiceMonitor", "PrometheusRule", "RayCluster"}

    objects = _objects(output)
    clusters = [o for o in objects if o["kind"] == "RayCluster"]
    assert [c["metadata"]["name"] for c in clusters] == [f"{engine_name(plan.served_name)}-{i}" for i in (1, 2)]
    assert not [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].startswith("engine-")]
    cluster = clusters[0]["spec"]
    head, [workers] = cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"]
    # the pods KubeRay makes from these templates are Kubernetes pods: their templates pass its schema strictly
    templates = tmp_path / "templates.yaml"
    templates.write_text("---\n".join(
        yaml.safe_dump({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": t})
        for name, t in (("head", head), ("workers", workers["template"]))
    ))  # fmt: skip
    pods = subprocess.run([validator, "--strict", str(templates)], capture_output=True, text=True)
    assert pods.returncode == 0 and "passed" in pods.stdout, pods.stdout + pods.stderr
    [ray_head] = head["spec"]["containers"]
    [ray_worker] = workers["template"]["spec"]["containers"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == plan.nodes - 1
    for container in (ray_head, ray_worker):  # each pod one node's GPUs
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert "command" not in container  # KubeRay's own: bash, our arguments, then `ray start --block`
    [start] = ray_head["args"]
    assert f"exec vllm {shlex.join(container_argv(plan))})" in start and "< 16)" in start  # waits for all 16
    # KubeRay runs "<our arguments> && ulimit -n 65536; ray start --head ... --block" in bash: valid shell
    joined = f" {start}  && ulimit -n 65536; ray start --head --dashboard-host=0.0.0.0 --block"
    assert subprocess.run(["bash", "-n", "-c", joined], capture_output=True).returncode == 0
    [service] = [
        o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == engine_name(plan.served_name)
    ]
    assert _matches(service["spec"]["selector"], head["metadata"]["labels"])  # the head serves vLLM's API
    assert not _matches(service["spec"]["selector"], workers["template"]["metadata"]["labels"])
    gateway = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "gateway")
    engine_arg = f"--engine={plan.served_name}=http://{engine_name(plan.served_name)}:8000"
    assert engine_arg in gateway["spec"]["template"]["spec"]["containers"][0]["args"]
    assert (
        "&id" not in (output / "manifests" / "engines.yaml").read_text()
    )  # parts used twice are written out, not aliased
    # each model is planned on whole nodes of its own (pods are scheduled apart), not on a share of one
    both = k8s_project(settings, ["llama-3.1-405b-instruct", "smollm2-135m"], gpus="h100-sxm:8", output=tmp_path / "b",
                       nodes=2)  # fmt: skip
    assert [(p.nodes, len(p.gpu_indices)) for p in both] == [(2, 8), (1, 1)]


def test_the_project_is_a_helm_chart_whose_template_emits_the_manifests(settings: Settings, tmp_path: Path) -> None:
    """No Helm renderer installs here (README of the chart): what its one template emits is checked instead.
    It joins manifests/*.yaml in lexical order (text/template ranges over a map's sorted keys), each after a
    `---`; joined so, they must read back as the same objects, every one of which passed the schemas above."""
    output = tmp_path / "chart"
    k8s_project(settings, ["smollm2-135m"], gpus="l4:1", output=output)
    chart = yaml.safe_load((output / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "deploykit" and chart["type"] == "application"
    assert all(part.isdigit() for part in chart["version"].split("."))  # SemVer 2, which Helm requires
    template = (output / "templates" / "manifests.yaml").read_text()
    assert template == infra_file("helm/deploykit/templates/manifests.yaml")
    assert '.Files.Glob "manifests/*.yaml"' in template and "$.Files.Get $path" in template
    assert sorted(p.name for p in output.iterdir()) == ["Chart.yaml", "README.md", "manifests", "templates"]
    files = sorted((output / "manifests").glob("*.yaml"))
    emitted = "".join(f"\n---\n{f.read_text()}" for f in files)  # what the template's range writes
    assert [o for o in yaml.safe_load_all(emitted) if o] == _objects(output)
    assert stat.S_IMODE((output / "manifests" / "secret.yaml").stat().st_mode) == 0o600


def test_gateway_options_reach_the_gateway_pods(settings: Settings, tmp_path: Path) -> None:
    options = K8sOptions(gateway_args=("--routing=prefix", "--max-concurrent-streams=64"))
    k8s_project(settings, ["smollm2-135m"], gpus="l4:1", output=tmp_path / "k8s", options=options)
    [gateway] = [
        o for o in _objects(tmp_path / "k8s") if o["kind"] == "Deployment" and o["metadata"]["name"] == "gateway"
    ]
    args = gateway["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-2:] == ["--routing=prefix", "--max-concurrent-streams=64"]
    with pytest.raises(UsageError, match="'--replicas=2' is not an option of the gateway"):
        k8s_project(
            settings,
            ["smollm2-135m"],
            gpus="l4:1",
            output=tmp_path / "b",
            options=K8sOptions(gateway_args=("--replicas=2",)),
        )
