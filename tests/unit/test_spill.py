"""Spill-over to a managed endpoint: when it takes over, how the request is rewritten, what it costs."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from deploykit.core.errors import NotFoundError, UsageError
from deploykit.models.prices import load_prices
from deploykit.serve.accounting.database import Database
from deploykit.serve.gateway import Backend, create_app
from deploykit.serve.gateway.app import GatewayOptions
from deploykit.serve.gateway.proxy import engine_session
from deploykit.serve.gateway.routing import Model
from deploykit.serve.gateway.spill import KEY_ENV, SpillTarget, parse_spill
from tests.fakes.engine import ANSWER, PROMPT_TOKENS, create_fake_engine
from tests.fakes.threaded import nobody_listening, serve_in_thread
from tests.unit.gateway_support import chat, client_of

pytestmark = pytest.mark.anyio
KEY = "sk-managed"


@pytest.fixture(scope="module")
def managed_url() -> Iterator[str]:
    """A stand-in for a managed API: serves gpt-4o-mini, only with the right key."""
    with serve_in_thread(create_fake_engine("gpt-4o-mini", api_key=KEY)) as url:
        yield url


def target(url: str, **limits: object) -> SpillTarget:
    return parse_spill(f"m1=gpt-4o-mini@{url}", load_prices(), KEY, **limits)  # type: ignore[arg-type]


def test_a_spill_spec_names_the_model_the_remote_model_and_the_url() -> None:
    t = target("https://api.openai.com/v1")
    assert (t.model, t.remote_model, t.azure) == ("m1", "gpt-4o-mini", False)
    assert t.endpoint("/v1/chat/completions") == "https://api.openai.com/v1/chat/completions"
    assert t.headers() == {"authorization": f"Bearer {KEY}"}
    assert t.price.cost(1_000_000, 1_000_000) == pytest.approx(0.15 + 0.60)
    azure = target("https://res.openai.azure.com/openai/deployments/mini?api-version=2024-06-01")
    assert azure.azure and azure.headers() == {"api-key": KEY}
    assert azure.endpoint("/v1/chat/completions") == (
        "https://res.openai.azure.com/openai/deployments/mini/chat/completions?api-version=2024-06-01"
    )


@pytest.mark.parametrize("spec", ["m1", "m1=gpt-4o-mini", "m1=gpt-4o-mini@ftp://x", "=gpt-4o-mini@https://x"])
def test_malformed_specs_say_the_format(spec: str) -> None:
    with pytest.raises(UsageError, match="MODEL=REMOTE_MODEL@URL"):
        parse_spill(spec, load_prices(), KEY)


def test_a_spill_needs_a_key_and_a_known_price() -> None:
    with pytest.raises(UsageError, match=KEY_ENV):
        parse_spill("m1=gpt-4o-mini@https://x", load_prices(), None)
    with pytest.raises(NotFoundError, match="No price for 'claude-9'"):
        parse_spill("m1=claude-9@https://x", load_prices(), KEY)


def rows(db: Database) -> list[tuple[object, ...]]:
    return db.query("SELECT status, replica, prompt_tokens, completion_tokens, cost_usd FROM requests ORDER BY id")


@pytest.mark.parametrize("azure", [False, True])
async def test_with_no_local_replica_ready_requests_spill_at_their_price(
    db: Database, engine_url: str, managed_url: str, azure: bool
) -> None:
    url = f"{managed_url}/openai/deployments/mini?api-version=2024-06-01" if azure else f"{managed_url}/v1"
    spill = target(url)
    async with engine_session() as session:
        local = Backend("m1", engine_url, session, status="stopped")
        app = create_app([local], db, GatewayOptions(spills=(spill,)))
        async with client_of(app) as client:
            answer = await client.post("/v1/chat/completions", json=chat(max_tokens=6, ignore_eos=True))
            streamed = await client.post("/v1/chat/completions", json=chat(max_tokens=4, stream=True))
            metrics = (await client.get("/metrics")).text
        app.state.gateway.close()
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "gpt-4o-mini" and answer.json()["choices"][0]["message"]["content"] == ANSWER
    assert streamed.status_code == 200 and b"[DONE]" in streamed.content and b'"usage"' not in streamed.content
    [first, second] = rows(db)
    assert first[:4] == (200, spill.url, PROMPT_TOKENS, 6)
    assert first[4] == pytest.approx(spill.price.cost(PROMPT_TOKENS, 6))
    assert second[:4] == (200, spill.url, PROMPT_TOKENS, 4)
    # what /metrics says was spent is what the ledger priced, for the dashboard's spend panel
    [spent] = [line for line in metrics.splitlines() if line.startswith('deploykit_spend_usd_total{key="",model="m1"}')]
    assert float(spent.split()[-1]) == pytest.approx(first[4] + second[4])  # type: ignore[operator]


async def test_a_deep_local_queue_or_slow_ttft_spills_and_a_calm_one_does_not(
    db: Database, engine_url: str, managed_url: str
) -> None:
    spill = target(f"{managed_url}/v1", max_queue=2, max_ttft_s=1.0)
    async with engine_session() as session:
        local = Backend("m1", engine_url, session, status="ready")
        app = create_app([local], db, GatewayOptions(spills=(spill,)))
        model = app.state.gateway.router.models["m1"]
        async with client_of(app) as client:
            calm = await client.post("/v1/chat/completions", json=chat())
            local.outstanding = 2  # two requests in flight on the only replica: the queue limit
            assert spill.takes(model) == "the local queue is full"
            queued = await client.post("/v1/chat/completions", json=chat())
            local.outstanding = 0
            model.recent_ttft_s = 3.0
            assert spill.takes(model) == "local TTFT is above the limit"
            slow = await client.post("/v1/chat/completions", json=chat())
        app.state.gateway.close()
    assert [r.json()["model"] for r in (calm, queued, slow)] == ["m1", "gpt-4o-mini", "gpt-4o-mini"]
    assert [r[4] is None for r in rows(db)] == [True, False, False]  # only spilled requests carry a cost


async def test_a_wrong_managed_key_is_relayed_not_hidden(db: Database, engine_url: str, managed_url: str) -> None:
    spill = parse_spill(f"m1=gpt-4o-mini@{managed_url}/v1", load_prices(), "wrong")
    async with engine_session() as session:
        app = create_app([Backend("m1", engine_url, session, status="stopped")], db, GatewayOptions(spills=(spill,)))
        async with client_of(app) as client:
            response = await client.post("/v1/chat/completions", json=chat())
        app.state.gateway.close()
    assert response.status_code == 401


async def test_a_managed_endpoint_that_cannot_be_reached_is_a_503_naming_the_model(
    db: Database, engine_url: str
) -> None:
    gone = nobody_listening() + "/v1"
    spill = parse_spill(f"m1=gpt-4o-mini@{gone}", load_prices(), KEY)
    async with engine_session() as session:
        app = create_app([Backend("m1", engine_url, session, status="stopped")], db, GatewayOptions(spills=(spill,)))
        async with client_of(app) as client:
            response = await client.post("/v1/chat/completions", json=chat())
        app.state.gateway.close()
    assert response.status_code == 503
    assert response.json()["error"] == {
        "message": "The engine for 'm1' did not answer (ClientConnectorError); it may have stopped.",
        "type": "service_unavailable",
        "param": None,
        "code": "engine_unavailable",
    }


def test_a_spill_target_s_edges() -> None:
    # a URL with user info keeps its @: the spec splits at the first one
    t = target("https://user@proxy.example/v1/")
    assert (t.remote_model, t.url) == ("gpt-4o-mini", "https://user@proxy.example/v1")  # no trailing slash
    assert t.price.cost(1_000_000, 0) == 0.15  # $0.15 per M prompt tokens, exactly
    assert json.loads(t.body({"model": "m1", "ignore_eos": True, "max_tokens": 3})) == {
        "model": "gpt-4o-mini",
        "max_tokens": 3,
    }  # vLLM's own field is not sent to a managed API
    for spec, hint in (
        ("m1", "For example: --spill smollm2-135m=gpt-4o-mini@https://api.openai.com/v1"),
        ("m1=gpt-4o-mini@https://x", f"export {KEY_ENV}=..."),
    ):
        with pytest.raises(UsageError) as refused:
            parse_spill(spec, load_prices(), KEY if "@" not in spec else None)
        assert refused.value.hint == hint


async def test_the_queue_is_averaged_over_ready_replicas_and_ttft_must_exceed_the_limit() -> None:
    spill = target("https://x/v1", max_queue=2, max_ttft_s=1.0)
    async with engine_session() as session:
        busy, idle = (
            Backend("m1", "http://a", session, status="ready"),
            Backend("m1", "http://b", session, status="ready"),
        )
        model = Model("m1", [busy, idle])
        busy.outstanding = 3  # 3 over two replicas: 1.5 each, under 2
        assert spill.takes(model) is None
        idle.outstanding = 1  # 4 over two: 2 each
        assert spill.takes(model) == "the local queue is full"
        busy.outstanding = idle.outstanding = 0
        model.recent_ttft_s = 1.0  # at the limit, not above it
        assert spill.takes(model) is None
        busy.status = idle.status = "stopped"
        assert spill.takes(model) == "no local replica is ready"
