"""The monitoring `deploy compose` ships, against the real thing: Debian's Prometheus scrapes a real gateway
(`deploykit serve --engine`, API keys on, /metrics behind the metrics token) in front of fake engine
processes, loads the alert rules, and answers every query of the Grafana dashboard with data. promtool
fires each alert rule on made-up series (infra/prometheus/alerts_test.yml)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from deploykit.core.ports import free_port
from deploykit.serve.deploy.project import infra_file
from tests.waiting import until

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def infra(tmp_path: Path) -> Path:
    """infra/ as deploykit ships it (package data), copied where promtool can read it."""
    root = tmp_path / "infra"
    for name in ("prometheus/alerts.yml", "prometheus/alerts_test.yml", "grafana/deploykit.json"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(infra_file(name))
    return root


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing: `make test` installs Debian's prometheus package")
        pytest.skip(f"{name} is not installed (apt-get install prometheus)")
    return found


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_each_alert_rule_fires_on_made_up_series(infra: Path) -> None:
    promtool = _tool("promtool")
    checked = subprocess.run([promtool, "check", "rules", "alerts.yml"], cwd=infra / "prometheus", capture_output=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"], cwd=infra / "prometheus", capture_output=True, text=True
    )
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    rules = yaml.safe_load((infra / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    tests = (infra / "prometheus" / "alerts_test.yml").read_text()
    assert all(f"alertname: {r['alert']}" in tests for r in rules)  # no rule left untested


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        p.send_signal(signal.SIGTERM)
    for p in started:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


def test_every_dashboard_query_returns_data_from_a_real_prometheus(
    tmp_path: Path, infra: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    prometheus = _tool("prometheus")
    env = {**os.environ, "DEPLOYKIT_HOME": str(tmp_path / "home"), "DEPLOYKIT_METRICS_TOKEN": "scrape-me"}
    env["DEPLOYKIT_SPILL_API_KEY"] = "sk-test"

    def start(*argv: str, **extra: str) -> None:
        log = (tmp_path / f"{len(processes)}.log").open("wb")
        processes.append(subprocess.Popen(argv, cwd=REPO, env={**env, **extra}, stdout=log, stderr=subprocess.STDOUT))

    engines = {"m1": free_port(), "m2": free_port(), "gpt-4o-mini": free_port()}  # the last: a managed API
    for model, port in engines.items():
        start(
            sys.executable, "-m", "tests.fakes.engine", "--port", str(port), "--model", model, "--token-delay", "0.005"
        )
    key = subprocess.run(
        [sys.executable, "-m", "deploykit", "keys", "create", "--name", "web", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    secret = json.loads(key.stdout)["key"]
    gateway = free_port()
    start(
        sys.executable, "-m", "deploykit", "serve", "--port", str(gateway), "--auth",
        f"--engine=m1=http://127.0.0.1:{engines['m1']}", f"--engine=m2=http://127.0.0.1:{engines['m2']}",
        f"--spill=m2=gpt-4o-mini@http://127.0.0.1:{engines['gpt-4o-mini']}/v1", "--spill-queue", "0",
    )  # fmt: skip
    url = f"http://127.0.0.1:{gateway}"
    until(lambda: _up(url + "/health"), "the gateway did not start")

    (tmp_path / "prom").mkdir()
    shutil.copy(infra / "prometheus" / "alerts.yml", tmp_path / "prom" / "alerts.yml")
    (tmp_path / "prom" / "metrics_token").write_text("scrape-me\n")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [
            {
                "job_name": "deploykit-gateway",
                "authorization": {"type": "Bearer", "credentials_file": "metrics_token"},
                "static_configs": [{"targets": [f"127.0.0.1:{gateway}"]}],
            },
            {"job_name": "vllm", "static_configs": [{"targets": [f"127.0.0.1:{engines['m1']}"]}]},
        ],
    }
    (tmp_path / "prom" / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    start(
        prometheus, f"--config.file={tmp_path / 'prom' / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}/api/v1"
    until(lambda: _up(f"http://127.0.0.1:{port}/-/ready"), "Prometheus did not start")

    # traffic of every kind the dashboard shows: answers local and spilled, streamed and not, and errors
    headers = {"Authorization": f"Bearer {secret}"}
    for i in range(12):
        for model in ("m1", "m2"):
            body = {"model": model, "prompt": "x", "max_tokens": 5, "stream": i % 2 == 0}
            assert httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=10).status_code == 200
        assert (
            httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "x"}, headers=headers).status_code
            == 404
        )
        time.sleep(0.25)

    def query(expr: str) -> list[object]:
        answer = httpx.get(api + "/query", params={"query": expr.replace("$__rate_interval", "20s")}).json()
        assert answer["status"] == "success", (expr, answer)
        result: list[object] = answer["data"]["result"]
        return result

    dashboard = json.loads((infra / "grafana" / "deploykit.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(expressions) == 16
    for expr in expressions:
        until(lambda expr=expr: bool(query(expr)), f"no data for {expr}", timeout_s=30)
    # the per-key panels name the key; the spend panel is what the ledger priced for m2's spilled requests
    assert {r["metric"]["key"] for r in query("sum by (key) (rate(deploykit_tokens_total[20s]))")} == {"web"}  # type: ignore[index]
    rules = httpx.get(api + "/rules").json()["data"]["groups"][0]["rules"]
    assert len(rules) == 8 and all(r["health"] == "ok" for r in rules), rules
    up = query('up{job="deploykit-gateway"}')
    assert [r["value"][1] for r in up] == ["1"], up  # type: ignore[index]  # scraped with the metrics token
