"""Routing: the model a request names, then its least busy ready replica, and retries across replicas."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi import FastAPI

from deploykit.core.errors import UsageError
from deploykit.core.ports import free_port
from deploykit.serve.accounting.database import Database
from deploykit.serve.gateway import Backend, create_app
from deploykit.serve.gateway.proxy import engine_session
from deploykit.serve.gateway.routing import Model, unavailable
from deploykit.serve.hardware import Gpu, Hardware
from tests.fakes.hub import minilm_snapshot
from tests.unit.gateway_support import chat, client_of

pytestmark = pytest.mark.anyio


def replicas(*outstanding: int, status: str = "ready") -> list[Backend]:
    return [
        Backend("m", f"http://r{i}", None, status=status, outstanding=n)  # type: ignore[arg-type]
        for i, n in enumerate(outstanding)
    ]


@pytest.mark.parametrize(
    ("statuses", "message"),
    [
        (("starting",), "The engine for 'm' is still starting; GET /ready says when it can serve."),
        (("stopped", "starting"), "The engine for 'm' is still starting; GET /ready says when it can serve."),
        (("stopped", "stopped"), "No replica of 'm' can serve now; they are being restarted."),
        (("stopped",), "The engine for 'm' is not running; the gateway is restarting it."),
    ],
)
def test_the_503_says_why_no_replica_serves(statuses: tuple[str, ...], message: str) -> None:
    model = Model("m", [b for s in statuses for b in replicas(0, status=s)])
    error = unavailable(model)
    assert (error.status, error.message, error.type, error.code) == (
        503,
        message,
        "service_unavailable",
        "engine_unavailable",
    )


def test_the_least_busy_ready_replica_is_picked() -> None:
    rs = replicas(3, 1, 2)
    assert Model("m", rs).pick() is rs[1]
    rs[1].status = "starting"
    assert Model("m", rs).pick() is rs[2]
    assert Model("m", rs).pick(exclude=[rs[2]]) is rs[0]


def test_ties_are_taken_in_turn() -> None:
    rs = replicas(0, 0, 0)
    model = Model("m", rs)
    assert {id(model.pick()) for _ in range(3)} == {id(r) for r in rs}


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [(["ready", "stopped"], "ready"), (["starting", "stopped"], "starting"), (["stopped", "stopped"], "stopped")],
)
def test_a_model_is_ready_when_any_replica_is(statuses: list[str], expected: str) -> None:
    rs = replicas(0, 0)
    for r, s in zip(rs, statuses, strict=True):
        r.status = s
    assert Model("m", rs).status == expected
    assert (Model("m", rs).pick() is None) == (expected != "ready")


async def test_a_replica_that_does_not_answer_is_skipped_for_the_next(db: Database, engine_url: str) -> None:
    async with engine_session() as session:
        dead = Backend("m1", f"http://127.0.0.1:{free_port()}", session, status="ready")
        alive = Backend("m1", engine_url, session, status="ready")
        app = create_app([dead, alive], db)
        async with client_of(app) as client:
            statuses = [(await client.post("/v1/chat/completions", json=chat())).status_code for _ in range(6)]
            ready = (await client.get("/ready")).json()
        app.state.gateway.close()
    assert statuses == [200] * 6
    assert dead.outstanding == alive.outstanding == 0
    assert ready["replicas"]["m1"] == {dead.replica: "ready", alive.replica: "ready"}


async def test_models_are_routed_by_name(make_app: Callable[..., FastAPI], backend: Backend) -> None:
    async with client_of(make_app()) as client:
        assert (await client.post("/v1/embeddings", json={"model": "m1", "input": "a b"})).json()["usage"] == {
            "prompt_tokens": 2,
            "total_tokens": 2,
        }


def gpu(index: int) -> Gpu:
    return Gpu(index, "NVIDIA A100-SXM4-80GB", 80 * 2**30, 80 * 2**30, 8.0)


def test_hardware_is_split_between_engines() -> None:
    eight = Hardware((0, 1), 64 * 2**30, 60 * 2**30, tuple(gpu(i) for i in range(8)))
    shares = eight.split(4)
    assert [[g.index for g in s.gpus] for s in shares] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    cpu = Hardware((0, 1), 24 * 2**30, 20 * 2**30)
    assert [s.ram_available_bytes for s in cpu.split(2)] == [10 * 2**30, 10 * 2**30]
    with pytest.raises(UsageError, match="at least 9 GPUs"):
        eight.split(9)


def test_prepare_plans_every_replica_on_its_share(tmp_path: Path) -> None:
    from deploykit.core.settings import Settings
    from deploykit.serve.runner import prepare

    eight = Hardware((0, 1), 512 * 2**30, 500 * 2**30, tuple(gpu(i) for i in range(8)))
    settings = Settings(home=tmp_path)
    plans = prepare(settings, ["llama-3.1-8b-instruct"], replicas=4, hardware=eight, environ={})
    # each replica plans within its own pair of GPUs (an 8B model needs only the first of them)
    assert [p.gpu_indices for p in plans] == [(0,), (2,), (4,), (6,)]
    assert len({p.port for p in plans}) == 4
    # every refusal is one message and a hint that says what to do, both as a user reads them
    refusals = [
        (
            {"models": ["llama-3.1-8b-instruct"] * 2},
            "A model is named twice.",
            "Use --replicas for several engines of one model.",
        ),
        (
            {"models": ["llama-3.1-8b-instruct"], "replicas": 2, "engine_port": 9000},
            "--engine-port fixes one engine's port; several engines pick free ones.",
            "Leave it out.",
        ),
        ({"models": ["llama-3.1-8b-instruct"], "replicas": 0}, "--replicas must be at least 1 (got 0).", ""),
    ]
    for kwargs, message, hint in refusals:
        with pytest.raises(UsageError) as e:
            prepare(settings, hardware=eight, environ={}, **kwargs)  # type: ignore[arg-type]
        assert (e.value.message, e.value.hint, e.value.exit_code) == (message, hint, 2)
    one = prepare(settings, ["llama-3.1-8b-instruct"], engine_port=9000, hardware=eight, environ={})
    assert [p.port for p in one] == [9000]  # one engine may have its port fixed
    assert len(prepare(settings, ["llama-3.1-8b-instruct"], hardware=eight, environ={})) == 1  # one replica by default


def test_a_lora_adapter_is_a_model_served_by_its_base_models_replicas() -> None:
    from deploykit.serve.gateway.routing import Router

    base = Backend("base", "http://r0", None, status="ready", adapters=("support",))  # type: ignore[arg-type]
    other = Backend("other", "http://r1", None, status="ready")  # type: ignore[arg-type]
    router = Router([base, other])
    assert list(router.models) == ["base", "support", "other"]
    assert router.route({"model": "support"}).pick() is base
    assert router.replicas == [base, other]  # each engine once, though it answers to two names


def test_prepare_gives_each_model_its_files_sampling_flags_environment_and_adapters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stored model starts from its own files, one not pulled yet from its hub id (for --dry-run); the
    model card's sampling, the user's engine flags and environment reach every engine; adapters only the
    first model's."""
    from deploykit.core.settings import Settings
    from deploykit.models.store import ModelStore
    from deploykit.serve.plan import Adapter
    from deploykit.serve.runner import prepare

    settings = Settings(home=tmp_path)
    files = minilm_snapshot()
    ModelStore(settings.models_dir).link("mine", files, source="test", format="safetensors", fingerprint="f")
    cpu = Hardware((0, 1), 24 * 2**30, 20 * 2**30)
    adapter = Adapter("support", tmp_path / "support", 8)
    plans = prepare(settings, ["smollm2-135m", "mine"], replicas=2, adapters=[adapter], engine_args=["--seed", "7"],
                    hardware=cpu, environ={"VLLM_CPU_KVCACHE_SPACE": "3"})  # fmt: skip

    def flag(argv: tuple[str, ...], name: str) -> str | None:
        return argv[argv.index(name) + 1] if name in argv else None

    assert [flag(p.argv, "--model") for p in plans] == ["HuggingFaceTB/SmolLM2-135M-Instruct"] * 2 + [str(files)] * 2
    assert [p.adapters for p in plans] == [("support",), ("support",), (), ()]
    assert all(flag(p.argv, "--seed") == "7" for p in plans)
    sampling = [flag(p.argv, "--override-generation-config") for p in plans]
    assert sampling == ['{"temperature":0.2,"top_p":0.9}'] * 2 + [None] * 2  # SmolLM2's card recommends it
    kv = [next(c for c in p.choices if c.setting == "VLLM_CPU_KVCACHE_SPACE") for p in plans]
    assert {(c.value, c.why) for c in kv} == {("3", "set in your environment")}
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "5")  # by default, the process's own environment
    [own] = prepare(settings, ["mine"], hardware=cpu)
    assert ("VLLM_CPU_KVCACHE_SPACE", "5") in {(c.setting, c.value) for c in own.choices}


# prefix routing


def chat_body(*contents: str) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": c} for c in contents]}


def test_the_prefix_key_reads_the_prompts_first_bytes() -> None:
    from deploykit.serve.gateway.routing import PREFIX_BYTES, prefix_key

    turn1 = chat_body("Tell me about Lyon.")
    turn2 = chat_body("Tell me about Lyon.", "And Paris?")
    assert prefix_key(turn1) == prefix_key(turn2)  # a conversation's turns repeat its opening
    assert prefix_key(turn1) != prefix_key(chat_body("Tell me about Nice."))
    system = {"role": "system", "content": "x" * 4 * PREFIX_BYTES}
    one, other = ({"model": "m", "messages": [system, {"role": "user", "content": q}]} for q in ("a?", "b?"))
    assert prefix_key(one) != prefix_key(other)  # one long system prompt, two conversations: they may spread
    long = "y" * PREFIX_BYTES
    assert prefix_key({"model": "m", "prompt": long + "1"}) == prefix_key({"model": "m", "prompt": long + "2"})
    parts = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "Tell me about Lyon."}]}]}
    assert prefix_key(parts) == prefix_key(turn1)  # text parts read as a string is
    assert prefix_key({"model": "m", "prompt": ["abc", "def"]}) == prefix_key({"model": "m", "prompt": "abc"})
    assert prefix_key({"model": "m", "input": "embed me"}) is None
    assert prefix_key({"model": "m", "messages": "nonsense"}) is None


def ring_model(*outstanding: int) -> Model:
    model = Model("m", replicas(*outstanding))
    model.prefix_routing = True
    return model


def test_a_prefix_keeps_its_replica_and_prefixes_spread_evenly() -> None:
    import random

    model = ring_model(0, 0, 0, 0)
    keys = [random.Random(7).getrandbits(64) for _ in range(1)] + [
        random.Random(i).getrandbits(64) for i in range(4000)
    ]
    picks = [model.pick(key=k) for k in keys]
    assert all(model.pick(key=k) is p for k, p in zip(keys[:200], picks[:200], strict=True))  # the same, every time
    shares = [sum(p is r for p in picks) / len(picks) for r in model.replicas]
    assert all(0.15 < s < 0.35 for s in shares), shares  # 64 points each: about a quarter each


def test_a_replica_that_goes_moves_only_its_own_prefixes() -> None:
    import random

    model = ring_model(0, 0, 0)
    keys = [random.Random(i).getrandbits(64) for i in range(600)]
    before = {k: model.pick(key=k) for k in keys}
    gone = model.replicas[1]
    gone.status = "starting"
    after = {k: model.pick(key=k) for k in keys}
    moved = [k for k in keys if after[k] is not before[k]]
    assert moved and all(before[k] is gone for k in moved)


def test_a_busy_replica_gives_its_prefixes_to_the_next_on_the_ring() -> None:
    model = ring_model(0, 0)
    key = 12345
    home = model.pick(key=key)
    assert home is not None
    home.outstanding = 3  # capacity: ceil(1.25 x (3 + 0 + 1) / 2) = 3, which it has reached
    other = model.pick(key=key)
    assert other is not home
    home.outstanding = 1  # within the bound again (capacity ceil(1.25 x 2 / 2) = 2): the prefix goes home
    assert model.pick(key=key) is home
    assert model.pick(exclude=[home], key=key) is other  # a failed replica is skipped for the next
    off = Model("m", model.replicas)
    assert off.pick(key=key) is other  # without prefix routing: the least busy


async def test_a_conversation_stays_on_one_replica_through_the_gateway(
    db: Database, engine_url: str, slow_engine_url: str
) -> None:
    from deploykit.serve.gateway.app import GatewayOptions

    async with engine_session() as session:
        two = [Backend("m1", url, session, status="ready") for url in (engine_url, slow_engine_url)]
        app = create_app(two, db, GatewayOptions(prefix_routing=True))
        async with client_of(app) as client:
            for conversation in range(12):
                history = [{"role": "user", "content": f"Conversation {conversation}: hello"}]
                for turn in range(3):
                    body = {"model": "m1", "messages": history, "max_tokens": 2}
                    answer = (await client.post("/v1/chat/completions", json=body)).json()
                    history += [answer["choices"][0]["message"], {"role": "user", "content": f"turn {turn}"}]
        app.state.gateway.close()
    rows = db.query("SELECT replica FROM requests ORDER BY id")
    by_conversation = [{r for (r,) in rows[i * 3 : i * 3 + 3]} for i in range(12)]
    assert all(len(replicas) == 1 for replicas in by_conversation)  # each conversation kept its replica
    assert len(set().union(*by_conversation)) == 2  # and the conversations used both
