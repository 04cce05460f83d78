"""LoRA adapters on demand: the registry, the launch plan, and the gateway loading registered adapters into
engines (the fake engine's runtime LoRA routes, over real HTTP) and routing their names."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deploykit.core.errors import NotFoundError, UsageError
from deploykit.serve.accounting.adapters import add_adapter, list_adapters, remove_adapter
from deploykit.serve.accounting.database import Database
from deploykit.serve.accounting.keys import create_key
from deploykit.serve.gateway import Backend, create_app
from deploykit.serve.gateway.app import GatewayOptions
from deploykit.serve.gateway.lora import sync_adapters
from deploykit.serve.gateway.proxy import engine_session
from deploykit.serve.plan import RUNTIME_LORA_RANK, with_adapters, with_runtime_lora
from tests.fakes.engine import create_fake_engine
from tests.fakes.threaded import serve_in_thread
from tests.unit.gateway_support import assert_openai_error, chat, client_of
from tests.unit.test_plan import LAPTOP, SMOLLM2, plan

pytestmark = pytest.mark.anyio


def adapter_dir(root: Path, name: str, rank: int = 8) -> Path:
    path = root / name
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    return path


def test_the_registry_keeps_names_unique_and_says_what_is_wrong(db: Database) -> None:
    added = add_adapter(db, "support", "m1", "/a/support", 8, now=100.0)
    assert list_adapters(db) == [added] and added.created_at == 100.0
    with pytest.raises(UsageError, match="registered already"):
        add_adapter(db, "support", "m1", "/a/other", 8)
    with pytest.raises(UsageError, match="as its base model is"):
        add_adapter(db, "m1", "m1", "/a/m1", 8)
    with pytest.raises(UsageError, match="not a valid adapter name"):
        add_adapter(db, "bad name", "m1", "/a", 8)
    assert remove_adapter(db, "support") == added
    with pytest.raises(NotFoundError) as gone:
        remove_adapter(db, "support")
    assert gone.value.hint == "Registered: none (`deploykit lora list`)."


def test_engines_for_adapters_on_demand_get_vllms_runtime_lora_api(tmp_path: Path) -> None:
    base = plan(SMOLLM2, LAPTOP)
    ready = with_runtime_lora(base)
    assert ready.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    tail = list(ready.argv[len(base.argv) :])
    assert tail == ["--enable-lora", "--max-lora-rank", str(RUNTIME_LORA_RANK), "--max-loras", "4"]
    assert with_runtime_lora(ready) is ready
    from deploykit.serve.plan import read_adapter

    static = with_adapters(base, [read_adapter(f"a={adapter_dir(tmp_path, 'a', 16)}")])
    both = with_runtime_lora(static)  # LoRA is on already: its rank stays, the runtime API is added
    assert both.argv.count("--enable-lora") == 1 and list(both.argv[len(static.argv) :]) == ["--max-loras", "4"]


@pytest.fixture
def runtime_engine() -> Iterator[str]:
    with serve_in_thread(create_fake_engine("m1", adapters=("static",), runtime_lora=True)) as url:
        yield url


async def test_a_registered_adapter_is_loaded_routed_listed_and_removed(
    db: Database, runtime_engine: str, tmp_path: Path
) -> None:
    _, narrow = create_key(db, "support-team", models=["support"])
    _, wide = create_key(db, "everyone")
    async with engine_session() as session:
        backend = Backend("m1", runtime_engine, session, status="ready", adapters=("static",))
        app = create_app([backend], db, GatewayOptions(auth=True))
        router = app.state.gateway.router
        async with client_of(app, authorization=f"Bearer {narrow}") as client:
            before = await client.post("/v1/chat/completions", json=chat(model="support", max_tokens=2))
            assert_openai_error(before, 404, "model_not_found")
            add_adapter(db, "support", "m1", str(adapter_dir(tmp_path, "support")), 8)
            add_adapter(db, "elsewhere", "m2", str(tmp_path / "nope"), 8)  # another model's: left alone
            await sync_adapters(router, list_adapters(db))
            assert backend.runtime_adapters == ("support",)
            answer = await client.post("/v1/chat/completions", json=chat(model="support", max_tokens=2))
            assert answer.status_code == 200, answer.text
            base = await client.post("/v1/chat/completions", json=chat(model="m1", max_tokens=2))
            assert_openai_error(base, 403, "model_not_allowed")  # the key names the adapter, not its base
            listed = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
            assert listed == ["support"]
        async with client_of(app, authorization=f"Bearer {wide}") as client:
            listed = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
            assert sorted(listed) == ["m1", "static", "support"]
        async with httpx.AsyncClient() as engine:
            loaded = [m["id"] for m in (await engine.get(runtime_engine + "/v1/models")).json()["data"]]
        assert sorted(loaded) == ["m1", "static", "support"]  # loaded once, by the gateway

        remove_adapter(db, "support")
        await sync_adapters(router, list_adapters(db))
        assert backend.runtime_adapters == () and "support" not in router.models
        async with httpx.AsyncClient() as engine:
            loaded = [m["id"] for m in (await engine.get(runtime_engine + "/v1/models")).json()["data"]]
        assert sorted(loaded) == ["m1", "static"]  # unloaded; the engine's own adapter stays
        app.state.gateway.close()


async def test_an_engine_that_restarts_gets_its_adapters_again_and_serves_none_meanwhile(
    db: Database, runtime_engine: str, tmp_path: Path
) -> None:
    add_adapter(db, "support", "m1", str(adapter_dir(tmp_path, "support")), 8)
    async with engine_session() as session:
        backend = Backend("m1", runtime_engine, session, status="ready")
        app = create_app([backend], db, GatewayOptions())
        router = app.state.gateway.router
        await sync_adapters(router, list_adapters(db))
        assert "support" in router.models
        backend.status = "starting"  # the supervisor restarts it: what it held is gone
        await sync_adapters(router, list_adapters(db))
        assert "support" not in router.models
        async with httpx.AsyncClient() as engine:  # the restarted engine holds nothing
            await engine.post(runtime_engine + "/v1/unload_lora_adapter", json={"lora_name": "support"})
        backend.status = "ready"
        await sync_adapters(router, list_adapters(db))
        assert router.models["support"].replicas == [backend]
        async with client_of(app) as client:
            assert (await client.post("/v1/completions", json={"model": "support", "prompt": "x"})).status_code == 200
        app.state.gateway.close()


async def test_an_adapter_the_engine_cannot_load_is_not_routed(
    db: Database, runtime_engine: str, tmp_path: Path
) -> None:
    add_adapter(db, "ghost", "m1", str(tmp_path / "missing"), 8)  # its directory is gone
    async with engine_session() as session:
        backend = Backend("m1", runtime_engine, session, status="ready")
        app = create_app([backend], db, GatewayOptions())
        await sync_adapters(app.state.gateway.router, list_adapters(db))
        assert backend.runtime_adapters == () and "ghost" not in app.state.gateway.router.models
        app.state.gateway.close()
