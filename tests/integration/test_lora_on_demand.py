"""LoRA adapters on demand, on real processes: `deploykit serve --engine` in front of a fake engine process
that has vLLM's runtime LoRA routes on; `deploykit lora add` and `lora remove`, as a user runs them, make the
adapter answer and stop answering within seconds, with no restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from deploykit.core.ports import free_port
from tests.waiting import ready, until

REPO = Path(__file__).resolve().parents[2]


def test_an_adapter_added_and_removed_while_the_gateway_runs(tmp_path: Path, engine: str) -> None:
    env = {**os.environ, "DEPLOYKIT_HOME": str(tmp_path)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "deploykit", *args], env=env, capture_output=True, text=True)

    adapter = tmp_path / "support"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = [sys.executable, "-m", "deploykit", "serve", "--port", str(port), f"--engine=m1={engine}"]
    gateway = subprocess.Popen(serve, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    body = {"model": "support", "prompt": "x", "max_tokens": 2}
    try:
        until(lambda: ready(url), "never ready")
        assert httpx.post(url + "/v1/completions", json=body).status_code == 404
        added = cli("lora", "add", "support", str(adapter), "--model", "m1", "--json")
        assert added.returncode == 0, added.stderr
        assert json.loads(added.stdout)["rank"] == 8
        until(lambda: httpx.post(url + "/v1/completions", json=body).status_code == 200, "never served", timeout_s=10)
        assert "support" in [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert [a["name"] for a in json.loads(cli("lora", "list", "--json").stdout)] == ["support"]
        assert httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/"}).status_code in (
            404,
            405,
        )  # the engine's route is not the gateway's
        assert cli("lora", "remove", "support").returncode == 0
        until(lambda: httpx.post(url + "/v1/completions", json=body).status_code == 404, "still served", timeout_s=10)
        loaded = [m["id"] for m in httpx.get(engine + "/v1/models").json()["data"]]
        assert loaded == ["m1"]  # unloaded from the engine itself
        missing = cli("lora", "add", "other", str(tmp_path / "nowhere"), "--model", "m1")
        assert missing.returncode == 2 and "No adapter_config.json" in missing.stderr
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(30)
