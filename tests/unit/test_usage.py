"""`deploykit usage` and `deploykit keys`: the ledger summed up, priced against managed APIs, by the library
and through the CLI."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from pathlib import Path

import pytest

from deploykit.core.errors import DeploykitError, NotFoundError, UsageError
from deploykit.models.prices import load_prices
from deploykit.serve.accounting.database import Database, connect
from deploykit.serve.accounting.ledger import DeploymentLog, Ledger, UsageRecord, UsageRow, deployment_hours
from deploykit.serve.accounting.usage import parse_since, usage_report
from tests.unit.test_cli import assert_clean_failure, deploykit

DAY = 86400.0
T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC).timestamp()


def record(at: float, model: str, prompt: int, completion: int, status: int = 200) -> UsageRecord:
    return UsageRecord(at, None, model, "/v1/chat/completions", status, prompt, completion, 10.0, 100.0, "r1")


def fill(db: Database, records: list[UsageRecord]) -> None:
    ledger = Ledger(db)

    async def write() -> None:
        await asyncio.gather(*(ledger.record(r) for r in records))

    asyncio.run(write())
    ledger.close()


@pytest.fixture
def ledger_db(tmp_path: Path) -> Database:
    db = connect(f"sqlite:///{tmp_path / 'deploykit.db'}")
    fill(
        db,
        [
            record(T0, "llama", 1_000_000, 500_000),
            record(T0 + 10, "llama", 1_000_000, 500_000, status=500),
            record(T0 + DAY, "qwen", 2_000_000, 0),
            record(T0 - 5 * DAY, "old", 7, 7),
        ],
    )
    # a GPU deployment: 2 GPUs for 3 hours, within the window
    db.execute(
        "INSERT INTO deployments (id, models, device, gpus, started_at, last_seen_at) VALUES (?, ?, ?, ?, ?, ?)",
        ("d1", "llama", "gpu", 2, T0, T0 + 3 * 3600),
    )
    return db


def test_usage_by_model_with_managed_prices_hand_checked(ledger_db: Database) -> None:
    report = usage_report(
        ledger_db,
        load_prices(),
        by="model",
        since=T0,
        compare=["gpt-4o-mini", "gpt-4o"],
        hourly_cost=2.0,
        today=dt.date(2026, 5, 2),
    )
    assert [(r.group, r.requests, r.errors, r.prompt_tokens, r.completion_tokens) for r in report.rows] == [
        ("llama", 2, 1, 2_000_000, 1_000_000),
        ("qwen", 1, 0, 2_000_000, 0),
    ]
    # gpt-4o-mini: $0.15 in, $0.60 out per 1M -> llama 2 x 0.15 + 1 x 0.60 = 0.90; qwen 2 x 0.15 = 0.30
    assert report.managed["gpt-4o-mini"] == pytest.approx([0.90, 0.30])
    assert report.managed_total["gpt-4o"] == pytest.approx(4 * 2.50 + 1 * 10.00)
    assert report.hours == {"gpu": pytest.approx(6.0)}  # 3 hours x 2 GPUs
    assert report.self_hosted_cost == pytest.approx(12.0)
    assert report.warnings == []  # the prices were a day old on that date


def test_usage_by_day_and_key(ledger_db: Database) -> None:
    by_day = usage_report(ledger_db, load_prices(), by="day", since=0)
    assert [(r.group, r.requests) for r in by_day.rows] == [("2026-10-27", 1), ("2026-11-01", 2), ("2026-11-02", 1)]
    by_key = usage_report(ledger_db, load_prices(), by="key", since=0)
    assert [(r.group, r.requests) for r in by_key.rows] == [("(no key)", 4)]


def test_old_prices_are_flagged_and_unknown_ones_refused(ledger_db: Database) -> None:
    report = usage_report(ledger_db, load_prices(), compare=["gpt-4o"], today=dt.date(2026, 11, 29))
    assert len(report.warnings) == 1 and "212 days old" in report.warnings[0]
    with pytest.raises(NotFoundError, match="No price for 'claude'"):
        usage_report(ledger_db, load_prices(), compare=["claude"])
    with pytest.raises(UsageError, match="--by"):
        usage_report(ledger_db, load_prices(), by="week")


def test_a_user_price_file_adds_and_overrides(tmp_path: Path) -> None:
    user = tmp_path / "prices.toml"
    user.write_text(
        "\n".join(
            [
                "[[service]]",
                'name = "gpt-4o-mini"',
                'provider = "openai"',
                "input_per_mtok = 0.10",
                "output_per_mtok = 0.40",
                "as_of = 2026-11-01",
                'source = "our negotiated contract"',
                'confidence = "official"',
            ]
        )
    )
    prices = load_prices(user)
    assert prices.find("gpt-4o-mini").input_per_mtok == 0.10
    assert prices.find("gpt-4o").input_per_mtok == 2.50
    user.write_text("[[service]]\nname = 'x'\n")
    with pytest.raises(DeploykitError, match="invalid"):
        load_prices(user)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("24h", T0 - DAY), ("7d", T0 - 7 * DAY), ("30m", T0 - 1800), ("2026-10-31", T0 - DAY)],
)
def test_since_takes_spans_and_dates(text: str, expected: float) -> None:
    assert parse_since(text, now=T0) == pytest.approx(expected)


def test_keys_and_usage_through_the_cli(tmp_path: Path) -> None:
    created = deploykit(tmp_path, "keys", "create", "--name", "ci", "--rpm", "60", "--json")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["key"].startswith(f"dk-{key['id']}-") and key["rpm"] == 60
    listed = json.loads(deploykit(tmp_path, "keys", "list", "--json").stdout)
    assert [(k["name"], k["status"]) for k in listed] == [("ci", "active")]
    assert "key" not in listed[0]
    assert deploykit(tmp_path, "keys", "revoke", "ci").returncode == 0
    assert json.loads(deploykit(tmp_path, "keys", "list", "--json").stdout)[0]["status"] == "revoked"
    assert_clean_failure(deploykit(tmp_path, "keys", "create", "--name", "ci"), 2, "exists already")
    assert_clean_failure(deploykit(tmp_path, "keys", "revoke", "nobody"), 3, "No API key named 'nobody'")
    assert_clean_failure(deploykit(tmp_path, "keys", "create", "--name", "x", "--expires", "soon"), 2, "not a date")
    usage = deploykit(tmp_path, "usage", "--compare", "gpt-4o-mini", "--json")
    assert usage.returncode == 0, usage.stderr
    assert json.loads(usage.stdout)["total"]["requests"] == 0
    assert_clean_failure(deploykit(tmp_path, "usage", "--compare", "nope"), 3, "No price for 'nope'", "[[service]]")


def test_budgets_through_the_cli(tmp_path: Path) -> None:
    assert deploykit(tmp_path, "keys", "create", "--name", "alice").returncode == 0
    made = deploykit(tmp_path, "keys", "budget", "team", "--monthly", "50", "--hard", "--keys", "alice")
    assert made.returncode == 0, made.stderr
    assert "Budget team: hard, $50.00 a month (UTC); keys: alice." in " ".join(made.stderr.split())
    both = json.loads(deploykit(tmp_path, "keys", "budget", "team", "--daily", "5", "--json").stdout)
    assert (both["monthly_usd"], both["daily_usd"], both["hard"], both["keys"]) == (50, 5, True, ["alice"])
    listed = json.loads(deploykit(tmp_path, "keys", "list", "--json").stdout)
    assert listed[0]["budget"] == "team"
    usage = deploykit(tmp_path, "usage", "--by", "budget")
    assert usage.returncode == 0, usage.stderr
    assert "team" in usage.stdout and "monthly" in usage.stdout and "$50.0000" in usage.stdout
    assert_clean_failure(deploykit(tmp_path, "keys", "budget", "solo"), 2, "needs a cap", "--monthly USD")
    assert_clean_failure(deploykit(tmp_path, "keys", "budget", "t", "--daily", "5", "--keys", "bob"), 3, "bob")
    assert_clean_failure(deploykit(tmp_path, "keys", "create", "--name", "b", "--budget", "x"), 3, "No budget")


def test_rows_are_written_and_read_by_column_name(db: Database) -> None:
    """Every field lands in the column of its own name (a reordered dataclass cannot shift them)."""
    import asyncio
    import dataclasses

    from deploykit.serve.accounting.keys import create_key, list_keys

    record = UsageRecord(
        at=1_700_000_000.5,
        key_id="k1",
        model="m",
        endpoint="/v1/x",
        status=201,
        prompt_tokens=3,
        completion_tokens=4,
        ttft_ms=5.5,
        duration_ms=6.5,
        replica="r",
        error="e",
        cost_usd=7.5,
    )
    ledger = Ledger(db)
    asyncio.run(ledger.record(record))
    ledger.close()
    for f in dataclasses.fields(UsageRecord):
        assert db.query(f"SELECT {f.name} FROM requests") == [(getattr(record, f.name),)], f.name
    key, _ = create_key(db, "team-a", models=["a", "b"], rpm=1, tpm=2, max_concurrent=3, expires_at=2e9, now=1e9)
    for f in dataclasses.fields(key):
        stored = db.query(f"SELECT {f.name} FROM api_keys")[0][0]
        assert stored == (json.dumps(["a", "b"]) if f.name == "models" else getattr(key, f.name)), f.name
    assert list_keys(db) == [key]


def test_the_report_carries_its_window_grouping_total_and_hourly_cost(ledger_db: Database) -> None:
    # a deployment that ended before the window, whose hours must not count
    ledger_db.execute(
        "INSERT INTO deployments (id, models, device, gpus, started_at, last_seen_at) VALUES (?, ?, ?, ?, ?, ?)",
        ("d0", "old", "gpu", 8, T0 - 6 * DAY, T0 - 5 * DAY),
    )
    report = usage_report(ledger_db, load_prices(), by="day", since=T0 - DAY, hourly_cost=2.5)
    assert (report.since, report.by, report.hourly_cost) == (T0 - DAY, "day", 2.5)
    assert report.total == UsageRow("total", 3, 1, 4_000_000, 1_000_000)  # the old row is outside the window
    assert report.hours == {"gpu": pytest.approx(6.0)}  # 2 GPUs for 3 h; the old deployment is not counted
    assert report.self_hosted_cost == pytest.approx(15.0)
    everything = usage_report(ledger_db, load_prices())  # from the beginning by default
    assert everything.total.requests == 4 and everything.hours["gpu"] == pytest.approx(6.0 + 8 * 24)
    with pytest.raises(UsageError) as refused:
        usage_report(ledger_db, load_prices(), by="week")
    assert (refused.value.message, refused.value.hint) == (
        "--by 'week' is not one of model, key, day, budget.",
        "Use --by model, --by key, --by day or --by budget.",
    )


def test_since_reads_spans_and_dates_in_utc() -> None:
    now = T0 + 7 * DAY
    assert parse_since("36h", now=now) == now - 36 * 3600 and parse_since("1.5w", now=now) == now - 1.5 * 7 * DAY
    assert parse_since("2026-11-01") == T0  # a date without a zone is UTC
    assert parse_since("2026-11-01T02:00:00+02:00") == T0  # one with a zone keeps it
    assert abs(parse_since("1m") - (dt.datetime.now(dt.UTC).timestamp() - 60)) < 5  # now, by default
    with pytest.raises(UsageError) as refused:
        parse_since("yesterday")
    assert (refused.value.message, refused.value.hint) == (
        "--since 'yesterday' is neither a span nor a date.",
        "Use e.g. 24h, 7d or 2026-11-01.",
    )


def test_deployment_hours_clip_to_the_window_and_count_gpus_or_machines(tmp_path: Path) -> None:
    db = connect(f"sqlite:///{tmp_path / 'hours.db'}")
    rows = [
        ("a", "gpu", 4, T0, T0 + 2 * 3600),  # 4 GPUs, 2 hours
        ("b", "cpu", 0, T0, T0 + 1.8),  # a CPU machine for 1.8 s: counts once, for exactly that long
        ("c", "gpu", 1, T0 - 3600, T0 - 1),  # ended before the window
    ]
    for id_, device, gpus, started, seen in rows:
        db.execute(
            "INSERT INTO deployments (id, models, device, gpus, started_at, last_seen_at) VALUES (?, 'm', ?, ?, ?, ?)",
            (id_, device, gpus, started, seen),
        )
    hours = deployment_hours(db, since=T0, now=T0 + 3600)  # now, an hour in: a's last hour is not counted yet
    assert hours == pytest.approx({"gpu": 4.0, "cpu": 1.8 / 3600}, rel=1e-6)  # 1 s more would be +55%
    assert deployment_hours(db, since=T0 + 7200, now=T0 + 9000) == {"gpu": 0.0}  # a was last seen at the edge
    db.close()


def test_a_deployment_log_records_start_heartbeat_and_stop(tmp_path: Path) -> None:
    db = connect(f"sqlite:///{tmp_path / 'log.db'}")
    log = DeploymentLog(db, ["m1", "m2"], "gpu", 2)
    [(models, device, gpus, started, seen, stopped)] = db.query(
        "SELECT models, device, gpus, started_at, last_seen_at, stopped_at FROM deployments"
    )
    assert (models, device, gpus, started == seen, stopped) == ("m1,m2", "gpu", 2, True, None)
    time.sleep(0.01)
    log.heartbeat()
    [(seen_again, stopped)] = db.query("SELECT last_seen_at, stopped_at FROM deployments WHERE id = ?", (log.id,))
    assert seen_again > seen and stopped is None
    time.sleep(0.01)
    log.stop()
    [(seen_last, stopped)] = db.query("SELECT last_seen_at, stopped_at FROM deployments WHERE id = ?", (log.id,))
    assert stopped == seen_last > seen_again
    db.close()
