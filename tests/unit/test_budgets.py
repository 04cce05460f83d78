"""Spend budgets: the windows, the budget records, and the gateway holding keys to them (in front of the fake
engine, on a real SQLite database)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import http.server
import json
import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI

from deploykit.core.errors import NotFoundError, UsageError
from deploykit.models.prices import load_prices
from deploykit.serve.accounting.budgets import (
    BudgetExceeded,
    BudgetKeeper,
    Hold,
    Price,
    get_budget,
    keys_of,
    parse_price,
    post_webhook,
    set_budget,
    windows,
)
from deploykit.serve.accounting.database import Database
from deploykit.serve.accounting.keys import create_key
from deploykit.serve.accounting.ledger import Ledger, UsageRecord, usage_by
from deploykit.serve.accounting.usage import usage_report
from deploykit.serve.gateway import Backend, create_app
from deploykit.serve.gateway.app import GatewayOptions
from deploykit.serve.gateway.proxy import engine_session
from tests.fakes.engine import PROMPT_TOKENS
from tests.unit.gateway_support import assert_openai_error, chat, client_of

pytestmark = pytest.mark.anyio
PRICE = Price(1000.0, 2000.0)  # $0.001 a prompt token, $0.002 a completion token: sums easy to check
BODY = json.dumps(chat(max_tokens=6)).encode()
# What one such request holds: the body's bytes as prompt tokens, and the gateway's token reservation (its
# prompt estimate, a token per 4 bytes, plus max_tokens) as completion tokens; and what it really costs.
WORST = PRICE.cost(len(BODY), math.ceil(len(BODY) / 4) + 6)
COST = PRICE.cost(PROMPT_TOKENS, 6)
HEADERS = {"content-type": "application/json"}


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()


# windows and records


def test_windows_are_the_utc_day_and_month_with_their_resets() -> None:
    day, month = windows(ts("2026-12-31T23:59:59"))
    assert (day.kind, day.period, day.resets_at) == ("daily", "2026-12-31", ts("2027-01-01T00:00:00"))
    assert (month.kind, month.period, month.resets_at) == ("monthly", "2026-12", ts("2027-01-01T00:00:00"))
    day, month = windows(ts("2027-02-28T00:00:00"))
    assert (day.period, day.resets_at, month.period, month.resets_at) == (
        "2027-02-28",
        ts("2027-03-01T00:00:00"),
        "2027-02",
        ts("2027-03-01T00:00:00"),
    )


def test_a_budget_named_as_a_key_is_its_own_and_changes_keep_what_is_not_given(db: Database) -> None:
    create_key(db, "team-a")
    made = set_budget(db, "team-a", monthly_usd=50, now=100.0)
    assert (made.monthly_usd, made.daily_usd, made.hard, made.created_at) == (50, None, False, 100.0)
    assert keys_of(db, "team-a") == ["team-a"]
    changed = set_budget(db, "team-a", daily_usd=5, hard=True, now=200.0)
    assert (changed.monthly_usd, changed.daily_usd, changed.hard, changed.created_at) == (50, 5, True, 100.0)
    assert set_budget(db, "team-a", monthly_usd=60).hard  # still hard


def test_keys_share_a_team_budget(db: Database) -> None:
    for name in ("alice", "bob", "carol"):
        create_key(db, name)
    set_budget(db, "research", monthly_usd=100, keys=["alice", "bob"])
    key, _ = create_key(db, "dave", budget="research")
    assert keys_of(db, "research") == ["alice", "bob", "dave"]
    assert key.budget == "research"
    with pytest.raises(NotFoundError) as missing:
        create_key(db, "erin", budget="nope")
    assert missing.value.hint == "Create it first: deploykit keys budget nope --monthly USD."


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "The budget 'b' needs a cap."),
        ({"monthly_usd": 0}, "--monthly must be a positive number of dollars (got 0)."),
        ({"daily_usd": float("nan")}, "--daily must be a positive number of dollars (got nan)."),
        ({"monthly_usd": 5, "webhook": "ftp://x"}, "--webhook 'ftp://x' is not an http(s) URL."),
        ({"monthly_usd": 5, "keys": ["ghost"]}, "No API key named 'ghost'."),
    ],
)
def test_a_wrong_budget_says_what_and_changes_nothing(db: Database, kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises((UsageError, NotFoundError)) as e:
        set_budget(db, "b", **kwargs)
    assert e.value.message == message
    with pytest.raises(NotFoundError):
        get_budget(db, "b")


def test_token_prices_read_in_and_out_per_million() -> None:
    assert parse_price("m1=0.02/0.08") == ("m1", Price(0.02, 0.08))
    assert parse_price("m1=0.5") == ("m1", Price(0.5, 0.5))
    for wrong in ("m1", "m1=a/b", "m1=1/2/3", "m1=-1", "=1", "m1=inf"):
        with pytest.raises(UsageError):
            parse_price(wrong)


# the keeper, on its own


def test_holds_count_until_settled_and_lapse_when_their_gateway_is_gone(db: Database) -> None:
    set_budget(db, "b", daily_usd=1.0, hard=True)
    keeper = BudgetKeeper(db, hold_s=60, clock=lambda: clock[0])
    clock = [ts("2026-12-07T12:00:00")]
    first = keeper.hold("b", 0.6)
    assert first is not None and first.headers["x-deploykit-budget-remaining-usd"] == "1.000000"
    with pytest.raises(BudgetExceeded) as refused:
        keeper.hold("b", 0.6)  # 0.6 held + 0.6 > 1.0
    assert str(refused.value) == (
        "The budget 'b' has $0.6000 of its daily cap of $1.00 spent or held; it resets at 2026-12-08T00:00:00Z."
    )
    clock[0] += 61  # the first hold's gateway died: its hold lapses
    assert keeper.hold("b", 0.6) is not None
    assert keeper.hold("nobody", 5.0) is None  # no such budget: nothing to hold to


def test_settling_with_the_ledger_row_moves_the_hold_to_spend_in_both_windows(db: Database) -> None:
    set_budget(db, "b", daily_usd=1.0, monthly_usd=10.0, hard=True)
    keeper, ledger = BudgetKeeper(db), Ledger(db)
    hold = keeper.hold("b", 0.5)
    assert hold is not None
    row = UsageRecord(hold.at, None, "m1", "/v1/chat/completions", 200, 5, 6, None, 1.0, None, cost_usd=0.2)

    async def write() -> None:
        await ledger.record(row, keeper.settlement(hold, 0.2))

    asyncio.run(write())
    ledger.close()
    day, month = windows(hold.at)
    spend = dict(db.query("SELECT period, spent_usd FROM budget_spend WHERE budget = 'b'"))
    assert spend == {day.period: pytest.approx(0.2), month.period: pytest.approx(0.2)}
    assert db.query("SELECT COUNT(*) FROM budget_holds") == [(0,)]
    assert db.query("SELECT cost_usd FROM requests") == [(0.2,)]


def race_for_holds(url: str, budget: str, usd: float = 0.07, threads: int = 8, tries: int = 10) -> list[Hold]:
    """`threads` threads, each with its own connection to the database at `url` (as separate gateway processes
    have), try `tries` times each to hold `usd` against `budget`: the holds they got."""
    from deploykit.serve.accounting.database import connect

    won: list[Hold] = []

    def race() -> None:
        own = connect(url)
        keeper = BudgetKeeper(own)
        for _ in range(tries):
            with contextlib.suppress(BudgetExceeded):
                if (hold := keeper.hold(budget, usd)) is not None:
                    won.append(hold)  # list.append is atomic
        own.close()

    running = [threading.Thread(target=race) for _ in range(threads)]
    for t in running:
        t.start()
    for t in running:
        t.join()
    return won


def test_concurrent_holds_never_pass_a_hard_cap(db: Database) -> None:
    set_budget(db, "b", daily_usd=1.0, hard=True)
    assert len(race_for_holds(db.url, "b")) == 14  # 14 x 0.07 = 0.98 <= 1.0 < 15 x 0.07, whatever the interleaving
    [(held,)] = db.query("SELECT SUM(usd) FROM budget_holds")
    assert held == pytest.approx(0.98)


def test_the_webhook_is_a_real_json_post(tmp_path: Path) -> None:
    received: list[dict[str, object]] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        post_webhook(f"http://127.0.0.1:{server.server_port}/hook", {"event": "budget.cap_reached", "budget": "b"})
        for _ in range(200):
            if received:
                break
            threading.Event().wait(0.01)
    finally:
        server.shutdown()
    assert received == [{"event": "budget.cap_reached", "budget": "b"}]


# through the gateway


@pytest.fixture
def priced(make_app: Callable[..., FastAPI]) -> FastAPI:
    return make_app(auth=True, token_prices={"m1": PRICE})


@pytest.fixture
def events(priced: FastAPI) -> Iterator[list[tuple[str, dict[str, object]]]]:
    sent: list[tuple[str, dict[str, object]]] = []
    priced.state.gateway.budgets._notify = lambda url, event: sent.append((url, event))
    yield sent


async def test_a_hard_budget_refuses_what_could_pass_its_cap_and_says_when_it_resets(
    priced: FastAPI, db: Database, events: list[tuple[str, dict[str, object]]]
) -> None:
    _, token = create_key(db, "team-a")
    cap = 2 * COST + WORST + 1e-9  # room for three requests: the third's worst case just fits
    set_budget(db, "team-a", daily_usd=cap, hard=True, webhook="http://hooks.test/x")
    async with client_of(priced, authorization=f"Bearer {token}") as client:
        answers = [await client.post("/v1/chat/completions", content=BODY, headers=HEADERS) for _ in range(5)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
    assert answers[0].headers["x-deploykit-budget"] == "team-a"
    assert float(answers[0].headers["x-deploykit-budget-remaining-usd"]) == pytest.approx(cap, abs=1e-6)
    assert float(answers[1].headers["x-deploykit-budget-remaining-usd"]) == pytest.approx(cap - COST, abs=1e-6)
    reset = windows(dt.datetime.now(dt.UTC).timestamp())[0].resets_at
    assert answers[0].headers["x-deploykit-budget-reset"] == dt.datetime.fromtimestamp(reset, dt.UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    error = assert_openai_error(answers[3], 429, "budget_exceeded")
    assert error["type"] == "insufficient_quota"
    assert f"${3 * COST:,.4f} of its daily cap of ${cap:,.2f}" in str(error["message"])
    assert f"could cost up to ${WORST:,.4f}" in str(error["message"])
    assert 0 < int(answers[3].headers["retry-after"]) <= 86400
    priced.state.gateway.ledger.close()
    costs = [c for (c,) in db.query("SELECT cost_usd FROM requests WHERE status = 200")]
    assert costs == [pytest.approx(COST)] * 3  # priced as the ledger prices: the engine's usage
    [(spent,)] = db.query("SELECT spent_usd FROM budget_spend WHERE period = ?", (windows(reset - 1)[0].period,))
    assert spent == pytest.approx(3 * COST) and spent <= cap
    assert [e["event"] for _, e in events] == ["budget.cap_reached"]  # once, at the first refusal
    assert events[0][0] == "http://hooks.test/x" and events[0][1]["window"] == "daily"


async def test_concurrent_requests_never_spend_past_a_hard_cap(
    db: Database, slow_engine_url: str, make_app: Callable[..., FastAPI]
) -> None:
    _, token = create_key(db, "team-a")
    cap = 3 * WORST + 1e-9
    set_budget(db, "team-a", daily_usd=cap, hard=True)
    async with engine_session() as session:
        backend = Backend("m1", slow_engine_url, session, status="ready")
        app = create_app([backend], db, GatewayOptions(auth=True, token_prices={"m1": PRICE}))
        async with client_of(app, authorization=f"Bearer {token}") as client:
            answers = await asyncio.gather(
                *(client.post("/v1/chat/completions", content=BODY, headers=HEADERS) for _ in range(20))
            )
        app.state.gateway.close()
    statuses = [a.status_code for a in answers]
    assert statuses.count(200) >= 3 and set(statuses) == {200, 429}
    [(spent,)] = db.query("SELECT SUM(cost_usd) FROM requests WHERE status = 200")
    assert spent <= cap
    assert db.query("SELECT SUM(spent_usd) FROM budget_spend") == [(pytest.approx(spent * 2),)]  # day and month


async def test_a_soft_budget_admits_warns_and_calls_its_webhook_once(
    priced: FastAPI, db: Database, events: list[tuple[str, dict[str, object]]]
) -> None:
    _, token = create_key(db, "team-a")
    set_budget(db, "team-a", monthly_usd=COST * 1.5, webhook="http://hooks.test/x")
    async with client_of(priced, authorization=f"Bearer {token}") as client:
        answers = [await client.post("/v1/chat/completions", content=BODY, headers=HEADERS) for _ in range(3)]
        metrics = await client.get("/metrics")
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert "x-deploykit-budget-warning" in answers[0].headers  # its worst case passes the cap already
    assert answers[2].headers["x-deploykit-budget-warning"] == f"over the soft monthly cap of ${COST * 1.5:,.2f}"
    assert answers[2].headers["x-deploykit-budget-remaining-usd"] == "0.000000"
    assert len(events) == 1 and events[0][1]["window"] == "monthly" and events[0][1]["hard"] is False
    assert events[0][1]["spent_usd"] == pytest.approx(2 * COST)  # the second request passed the cap
    assert 'deploykit_budget_cap_usd{budget="team-a",window="monthly",hard="false"}' in metrics.text
    spent = [line for line in metrics.text.splitlines() if line.startswith("deploykit_budget_spent_usd{")]
    assert len(spent) == 1 and float(spent[0].split()[-1]) == pytest.approx(3 * COST)


async def test_a_budget_that_cannot_be_priced_or_bounded_refuses_rather_than_runs(
    make_app: Callable[..., FastAPI], db: Database
) -> None:
    _, token = create_key(db, "team-a")
    set_budget(db, "team-a", monthly_usd=10, hard=True)
    unpriced = make_app(auth=True)
    async with client_of(unpriced, authorization=f"Bearer {token}") as client:
        refused = await client.post("/v1/chat/completions", json=chat(max_tokens=6))
    assert_openai_error(refused, 403, "budget_unpriced")
    assert "deploykit serve --token-price m1=IN/OUT" in refused.json()["error"]["message"]
    async with client_of(make_app(auth=True, token_prices={"m1": PRICE}), authorization=f"Bearer {token}") as client:
        unbounded = await client.post("/v1/chat/completions", json=chat())
    assert_openai_error(unbounded, 400, "max_tokens_required")
    assert db.query("SELECT COUNT(*) FROM budget_holds") == [(0,)]  # nothing held for them


async def test_a_quota_refusal_holds_nothing_and_a_budget_refusal_takes_no_quota(priced: FastAPI, db: Database) -> None:
    _, token = create_key(db, "team-a", rpm=1)
    set_budget(db, "team-a", daily_usd=WORST / 2, hard=True)
    async with client_of(priced, authorization=f"Bearer {token}") as client:
        over_budget = await client.post("/v1/chat/completions", content=BODY, headers=HEADERS)
        set_budget(db, "team-a", daily_usd=10)
        ok = await client.post("/v1/chat/completions", content=BODY, headers=HEADERS)  # the rpm was given back
        limited = await client.post("/v1/chat/completions", content=BODY, headers=HEADERS)
    assert [r.status_code for r in (over_budget, ok, limited)] == [429, 200, 429]
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    priced.state.gateway.ledger.close()
    assert db.query("SELECT COUNT(*) FROM budget_holds") == [(0,)]


async def test_priced_requests_are_costed_in_the_ledger_and_summed_by_budget(priced: FastAPI, db: Database) -> None:
    _, free = create_key(db, "free")
    _, team = create_key(db, "alice")
    set_budget(db, "research", monthly_usd=10, keys=["alice"])
    for token in (free, team, team):
        async with client_of(priced, authorization=f"Bearer {token}") as client:
            assert (await client.post("/v1/chat/completions", content=BODY, headers=HEADERS)).status_code == 200
    priced.state.gateway.ledger.close()
    rows = {r.group: (r.requests, r.cost_usd) for r in usage_by(db, "budget")}
    assert rows == {"(no budget)": (1, pytest.approx(COST)), "research": (2, pytest.approx(2 * COST))}
    report = usage_report(db, load_prices(), by="budget")
    assert [(b["budget"], b["window"], b["spent_usd"]) for b in report.budgets] == [
        ("research", "monthly", pytest.approx(2 * COST))
    ]
