"""The gateway in front of the fake engine, both in-process (httpx ASGI transports on each side)."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import httpx
import pytest

from deploykit import __version__
from deploykit.core.ports import free_port
from deploykit.serve.accounting.database import Database
from deploykit.serve.gateway import Backend
from deploykit.serve.gateway.app import Gateway, GatewayOptions
from deploykit.serve.gateway.proxy import engine_session
from tests.fakes.engine import ANSWER, create_fake_engine
from tests.fakes.threaded import serve_in_thread
from tests.unit.gateway_support import assert_openai_error, chat

pytestmark = pytest.mark.anyio


async def test_health_answers_whatever_the_engine_does(gateway: httpx.AsyncClient, backend: Backend) -> None:
    backend.status = "stopped"
    assert (await gateway.get("/health")).json() == {"status": "ok"}


async def test_version_names_the_engine_and_deploykit(gateway: httpx.AsyncClient, backend: Backend) -> None:
    assert (await gateway.get("/version")).json() == {"version": "0.0.0-fake", "deploykit": __version__}
    backend.status = "starting"
    assert (await gateway.get("/version")).json() == {"version": None, "deploykit": __version__}


async def test_ready_follows_the_engine(gateway: httpx.AsyncClient, backend: Backend) -> None:
    replicas = {"m1": {backend.replica: "ready"}}
    whole = {"status": "ready", "models": {"m1": "ready"}, "replicas": replicas, "startup": {"m1": {}}}
    assert (await gateway.get("/ready")).json() == whole
    backend.startup = {"ready_s": 35.0, "phases_s": {"imports": 9.0, "compile": 11.0}, "compile_cache": "hit"}
    assert (await gateway.get("/ready")).json()["startup"] == {"m1": {backend.replica: backend.startup}}
    backend.status = "starting"
    response = await gateway.get("/ready")
    assert_openai_error(response, 503, "not_ready", "Not every model can serve yet.")
    assert response.json()["models"] == {"m1": "starting"}
    assert response.json()["replicas"] == {"m1": {backend.replica: "starting"}}


async def test_models_lists_the_engines_models(gateway: httpx.AsyncClient) -> None:
    response = await gateway.get("/v1/models")
    assert [m["id"] for m in response.json()["data"]] == ["m1"]


async def test_chat_non_streaming_passes_the_engines_answer_through(gateway: httpx.AsyncClient) -> None:
    response = await gateway.post("/v1/chat/completions", json=chat(max_tokens=6))
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == ANSWER


async def test_completions_streaming_relays_every_event(gateway: httpx.AsyncClient) -> None:
    body = {"model": "m1", "prompt": "The capital of France is", "max_tokens": 6, "stream": True}
    async with gateway.stream("POST", "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
    events = [e.removeprefix("data: ") for e in raw.decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == ANSWER


async def test_the_engine_session_caps_no_connections_and_bounds_connects_and_reads_only() -> None:
    async with engine_session() as session:
        assert session.connector is not None and session.connector.limit == 0  # aiohttp's default is 100
        # a generation may run for minutes: no total bound, a bounded connect, a read bound (serve's option)
        assert session.timeout == aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=600.0)
    async with engine_session(30.0) as session:
        assert session.timeout.sock_read == 30.0


async def test_malformed_json_is_a_400_in_openai_shape(gateway: httpx.AsyncClient) -> None:
    response = await gateway.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    error = assert_openai_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert "not valid JSON" in str(error["message"])


@pytest.mark.parametrize("body", [b"[]", b'"text"', b"null"])
async def test_a_body_that_is_not_an_object_is_a_400(gateway: httpx.AsyncClient, body: bytes) -> None:
    response = await gateway.post("/v1/completions", content=body)
    assert_openai_error(response, 400, None, "The request body must be a JSON object.")


async def test_unknown_model_is_a_404_that_names_what_is_served(gateway: httpx.AsyncClient) -> None:
    error = assert_openai_error(
        await gateway.post("/v1/chat/completions", json=chat(model="gpt-9")), 404, "model_not_found"
    )
    assert "m1" in str(error["message"]) and error["param"] == "model"


async def test_missing_model_is_a_400(gateway: httpx.AsyncClient) -> None:
    assert_openai_error(await gateway.post("/v1/chat/completions", json={"messages": []}), 400, "missing_model")


async def test_engine_errors_pass_through_with_their_status(gateway: httpx.AsyncClient, backend: Backend) -> None:
    # the fake engine itself rejects this name; the gateway must relay the 404, not rewrite it
    with serve_in_thread(create_fake_engine("other")) as url:
        backend.url = url
        response = await gateway.post("/v1/chat/completions", json=chat())
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "no such model"


async def test_starting_or_stopped_engine_is_a_503(gateway: httpx.AsyncClient, backend: Backend) -> None:
    for status in ("starting", "stopped"):
        backend.status = status
        assert_openai_error(await gateway.post("/v1/chat/completions", json=chat()), 503, "engine_unavailable")


async def test_unreachable_engine_is_a_503(gateway: httpx.AsyncClient, backend: Backend) -> None:
    backend.url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    response = await gateway.post("/v1/chat/completions", json=chat())
    error = assert_openai_error(response, 503, "engine_unavailable")
    assert "ClientConnectorError" in str(error["message"])


async def test_unknown_path_is_a_404_in_openai_shape(gateway: httpx.AsyncClient) -> None:
    assert_openai_error(await gateway.get("/v1/nothing"), 404)


async def test_stop_waits_for_requests_at_most_its_timeout(backend: Backend, db: Database) -> None:
    gateway = Gateway([backend], db, GatewayOptions())
    gateway.started()  # a request that never ends
    started = time.monotonic()
    await asyncio.wait_for(gateway.stop(timeout_s=0.3), 10)
    assert 0.3 <= time.monotonic() - started < 5 and gateway.stopping.is_set()
