"""The database seam (serve/accounting/database.py) held to one contract on both of its implementations: SQLite
and a real PostgreSQL server, each test on a database of its own. Two implementations that must answer
alike check each other: statements, transactions that commit whole or not at all, placeholders, and the
schema's migrations."""

from __future__ import annotations

import sqlite3
import stat
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploykit.core.errors import MissingDependencyError, UsageError
from deploykit.core.ports import free_port
from deploykit.serve.accounting.database import MIGRATIONS, Database, Run, connect, migrate, opened

TABLE = "CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER NOT NULL)"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty database of each kind (for PostgreSQL, a database created for this test)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'deploykit.db'}"
        return
    import psycopg

    server = request.getfixturevalue("postgres_url")
    name = f"t{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield server.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def db(url: str) -> Iterator[Database]:
    with opened(url) as database:
        database.execute(TABLE)
        yield database


def test_connect_brings_an_empty_database_to_the_latest_schema_once(url: str) -> None:
    with opened(url) as db:
        assert db.url == url
        names = [name for (name,) in db.query("SELECT name FROM migrations ORDER BY name")]
        assert names == [name for name, _ in MIGRATIONS]
        assert migrate(db) == []  # applied once
        # the ledger's rows are numbered by the database, in each dialect
        row = "INSERT INTO requests (at, model, endpoint, status, prompt_tokens, completion_tokens, duration_ms, day)"
        db.executemany(row + " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [(1.0, "m", "/v1", 200, 1, 2, 3.0, "d")] * 2)
        assert db.query("SELECT id, model FROM requests ORDER BY id") == [(1, "m"), (2, "m")]
    with opened(url) as again:  # a second connection applies nothing
        assert migrate(again) == []


def test_a_database_that_missed_migrations_gets_only_those(url: str) -> None:
    with opened(url) as db:
        db.execute("DELETE FROM migrations WHERE name IN ('m005_shared_quotas', 'm009_audio')")
        for table in ("quota_leases", "quota_state"):  # what m005 made (m009 adds a column to quota_state)
            db.execute(f"DROP TABLE {table}")
        for table, column in (("api_keys", "audio_spm"), ("requests", "audio_seconds")):  # the rest of m009
            db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        assert migrate(db) == ["m005_shared_quotas", "m009_audio"]  # in their order, and only those
        assert db.query("SELECT count(*), max(audio) FROM quota_state") == [(0, None)]


def test_execute_and_query(db: Database) -> None:
    assert db.execute("INSERT INTO t (id, n) VALUES (?, ?)", ("a", 1)) == 1
    with opened(db.url) as other:  # committed at once: another gateway's connection sees it
        assert other.query("SELECT n FROM t") == [(1,)]
    db.execute("INSERT INTO t (id, n) VALUES (?, ?)", ("b", 2))
    assert db.execute("UPDATE t SET n = n + ?", (10,)) == 2  # the rows it changed
    assert db.query("SELECT id, n FROM t ORDER BY id") == [("a", 11), ("b", 12)]
    assert db.query("SELECT n FROM t WHERE id = ?", ("nobody",)) == []
    # a literal % is not a placeholder in either dialect
    assert db.query("SELECT id FROM t WHERE id LIKE '%' || ? ORDER BY id", ("b",)) == [("b",)]
    assert db.query("SELECT '50%' FROM t WHERE id = ?", ("a",)) == [("50%",)]


def test_executemany_commits_every_row_or_none(db: Database) -> None:
    db.executemany("INSERT INTO t (id, n) VALUES (?, ?)", [("a", 1), ("b", 2)])
    assert db.query("SELECT count(*) FROM t") == [(2,)]
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        db.executemany("INSERT INTO t (id, n) VALUES (?, ?)", [("c", 3), ("a", 4)])  # the second row fails
    assert db.query("SELECT id FROM t ORDER BY id") == [("a",), ("b",)]


def test_atomic_commits_every_statement_or_none(db: Database) -> None:
    db.atomic([("INSERT INTO t (id, n) VALUES (?, ?)", ("a", 1)), ("UPDATE t SET n = ? WHERE id = ?", (5, "a"))])
    assert db.query("SELECT n FROM t") == [(5,)]
    with pytest.raises(Exception, match=r"(?i)null"):
        db.atomic([("UPDATE t SET n = ?", (6,)), ("INSERT INTO t (id, n) VALUES (?, ?)", ("b", None))])
    assert db.query("SELECT id, n FROM t") == [("a", 5)]
    db.execute("INSERT INTO t (id, n) VALUES (?, ?)", ("c", 7))  # the connection is usable after the rollback
    assert db.query("SELECT count(*) FROM t") == [(2,)]


def test_exclusive_returns_the_work_and_commits_it_or_rolls_it_back(db: Database) -> None:
    def work(run: Run) -> list[object]:
        assert run("INSERT INTO t (id, n) VALUES (?, ?)", ("a", 1)) == []  # a statement without rows
        return [run("SELECT n FROM t WHERE id = ?", ("a",)), run("UPDATE t SET n = 2")]

    assert db.exclusive(work) == [[(1,)], []]
    assert db.query("SELECT n FROM t") == [(2,)]

    def fails(run: Run) -> None:
        run("UPDATE t SET n = 3")
        raise RuntimeError("midway")

    with pytest.raises(RuntimeError, match="midway"):
        db.exclusive(fails)
    assert db.query("SELECT n FROM t") == [(2,)]
    assert db.execute("UPDATE t SET n = 4") == 1  # not left inside a transaction


def test_a_closed_database_refuses_statements(url: str) -> None:
    db = connect(url)
    db.close()
    with pytest.raises(Exception, match=r"(?i)closed"):
        db.query("SELECT 1")


def test_urls_that_cannot_be_used_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="Unsupported database URL 'mysql://x/y'") as e:
        connect("mysql://x/y")
    assert e.value.hint == "Use sqlite:///PATH or postgresql://USER@HOST/DB (DEPLOYKIT_DATABASE_URL)."
    for scheme in ("postgresql", "postgres"):
        with pytest.raises(UsageError, match=r"^Cannot connect to PostgreSQL: ") as e:
            connect(f"{scheme}://nobody@127.0.0.1:{free_port()}/db")
        assert e.value.hint == "Check DEPLOYKIT_DATABASE_URL."


def test_postgresql_without_its_driver_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the postgres extra were not installed
    with pytest.raises(MissingDependencyError) as e:
        connect("postgresql://nobody@127.0.0.1:1/db")
    assert (e.value.message, e.value.hint) == (
        "A PostgreSQL database needs psycopg.",
        "Install it: pip install 'deploykit[postgres]'.",
    )


def test_a_sqlite_database_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "home" / "new" / "deploykit.db"  # folders made as needed, the last private
    with opened(f"sqlite:///{path}") as db:
        db.execute(TABLE)
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        for file in (path, path.with_name("deploykit.db-wal")):
            assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    # one left readable by others is tightened, and WAL is the journal another connection finds
    path.chmod(0o644)
    with opened(f"sqlite:///{path}"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        other = sqlite3.connect(path)
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        other.close()
