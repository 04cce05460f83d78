"""The gateway's database: API keys and the usage ledger, in SQLite (default) or PostgreSQL.

One small seam over both: `connect(url)` gives a `Database` whose SQL uses `?` placeholders, and the
schema evolves by ordered, named migrations recorded in the `migrations` table. SQLite runs in WAL
mode with synchronous=NORMAL: a committed row survives the gateway being killed (`kill -9`), which is
what the ledger promises; surviving a power cut would need synchronous=FULL.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from deploykit.core.errors import MissingDependencyError, UsageError

Row = tuple[Any, ...]
Run = Callable[[str, Sequence[Any]], list[Row]]
T = TypeVar("T")

# (name, SQL) in order; `{id}` is an auto-increment primary key in each dialect. Never edit one that
# has shipped: add the next.
MIGRATIONS: tuple[tuple[str, str], ...] = (
    (
        "m001_keys",
        """
        CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            secret_sha256 TEXT NOT NULL,
            models TEXT,
            rpm INTEGER,
            tpm INTEGER,
            max_concurrent INTEGER,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION,
            revoked_at DOUBLE PRECISION
        )
        """,
    ),
    (
        "m002_requests",
        """
        CREATE TABLE requests (
            id {id},
            at DOUBLE PRECISION NOT NULL,
            key_id TEXT,
            model TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            status INTEGER NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            ttft_ms DOUBLE PRECISION,
            duration_ms DOUBLE PRECISION NOT NULL,
            replica TEXT,
            error TEXT,
            day TEXT NOT NULL
        );
        CREATE INDEX requests_at ON requests (at);
        CREATE INDEX requests_day ON requests (day);
        """,
    ),
    (
        "m003_deployments",
        """
        CREATE TABLE deployments (
            id TEXT PRIMARY KEY,
            models TEXT NOT NULL,
            device TEXT NOT NULL,
            gpus INTEGER NOT NULL,
            started_at DOUBLE PRECISION NOT NULL,
            last_seen_at DOUBLE PRECISION NOT NULL,
            stopped_at DOUBLE PRECISION
        )
        """,
    ),
    ("m004_request_cost", "ALTER TABLE requests ADD COLUMN cost_usd DOUBLE PRECISION"),
    (
        "m005_shared_quotas",
        """
        CREATE TABLE quota_state (
            key_id TEXT PRIMARY KEY,
            requests DOUBLE PRECISION,
            tokens DOUBLE PRECISION,
            updated DOUBLE PRECISION NOT NULL
        );
        CREATE TABLE quota_leases (
            id TEXT PRIMARY KEY,
            key_id TEXT NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX quota_leases_key ON quota_leases (key_id, expires_at);
        """,
    ),
    (
        "m006_budgets",
        """
        CREATE TABLE budgets (
            name TEXT PRIMARY KEY,
            daily_usd DOUBLE PRECISION,
            monthly_usd DOUBLE PRECISION,
            hard INTEGER NOT NULL,
            webhook TEXT,
            created_at DOUBLE PRECISION NOT NULL
        );
        CREATE TABLE budget_spend (
            budget TEXT NOT NULL,
            period TEXT NOT NULL,
            spent_usd DOUBLE PRECISION NOT NULL,
            notified INTEGER NOT NULL,
            PRIMARY KEY (budget, period)
        );
        CREATE TABLE budget_holds (
            id TEXT PRIMARY KEY,
            budget TEXT NOT NULL,
            usd DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX budget_holds_budget ON budget_holds (budget, expires_at);
        ALTER TABLE api_keys ADD COLUMN budget TEXT
        """,
    ),
    ("m007_key_priority", "ALTER TABLE api_keys ADD COLUMN priority TEXT"),
    (
        "m008_adapters",
        """
        CREATE TABLE adapters (
            name TEXT PRIMARY KEY,
            model TEXT NOT NULL,
            path TEXT NOT NULL,
            rank INTEGER NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )
        """,
    ),
    (
        "m009_audio",
        """
        ALTER TABLE api_keys ADD COLUMN audio_spm INTEGER;
        ALTER TABLE quota_state ADD COLUMN audio DOUBLE PRECISION;
        ALTER TABLE requests ADD COLUMN audio_seconds DOUBLE PRECISION
        """,
    ),
)


class Database(Protocol):
    url: str

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement in its own transaction; the number of rows it changed."""

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement per row, all in one transaction (one commit)."""

    def atomic(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """Run the statements in one transaction: all commit, or none."""

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    def exclusive(self, work: Callable[[Run], T]) -> T:
        """Run `work` in one transaction, all of it committed or none; `work` gets a function that runs one
        statement and returns its rows. SQLite lets no other writer, in any process, in until it ends; in
        PostgreSQL the rows it updates stay locked until then (so work that first updates the row it reads
        is serialised with every other such work, across gateways)."""

    def close(self) -> None: ...


def connect(url: str) -> Database:
    """Open the database at `url` (sqlite:///PATH or postgresql://...) and bring its schema up to date."""
    db: Database
    if url.startswith("sqlite:///"):
        db = SQLiteDatabase(Path(url.removeprefix("sqlite:///")))
    elif url.startswith(("postgresql://", "postgres://")):
        db = PostgresDatabase(url)
    else:
        raise UsageError(
            f"Unsupported database URL '{url}'.",
            "Use sqlite:///PATH or postgresql://USER@HOST/DB (DEPLOYKIT_DATABASE_URL).",
        )
    migrate(db)
    return db


@contextmanager
def opened(url: str) -> Iterator[Database]:
    """`connect`, closing the database when the block ends."""
    db = connect(url)
    try:
        yield db
    finally:
        db.close()


def migrate(db: Database) -> list[str]:
    """Apply the migrations this database has not had yet, in order; the names applied."""
    db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")
    done = {name for (name,) in db.query("SELECT name FROM migrations")}
    serial = "BIGSERIAL PRIMARY KEY" if isinstance(db, PostgresDatabase) else "INTEGER PRIMARY KEY"
    applied = []
    for name, sql in MIGRATIONS:
        if name in done:
            continue
        statements: list[tuple[str, Sequence[Any]]] = [
            (s.strip(), ()) for s in sql.replace("{id}", serial).split(";") if s.strip()
        ]
        statements.append(("INSERT INTO migrations (name, applied_at) VALUES (?, ?)", (name, time.time())))
        db.atomic(statements)
        applied.append(name)
    return applied


class SQLiteDatabase:
    """One connection shared by the threads that use it, behind a lock (SQLite serialises writes anyway)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _make_private(path)
        self.url = f"sqlite:///{path}"
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._lock = threading.Lock()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._lock:
            return self._conn.execute(sql, params).rowcount

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.atomic([(sql, row) for row in rows])

    def atomic(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    self._conn.execute(sql, params)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._lock:
            return list(self._conn.execute(sql, params).fetchall())

    def exclusive(self, work: Callable[[Run], T]) -> T:
        def run(sql: str, params: Sequence[Any] = ()) -> list[Row]:
            return list(self._conn.execute(sql, params).fetchall())

        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")  # the write lock, which other processes' writers wait for
            try:
                result = work(run)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return result

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _make_private(path: Path) -> None:
    """Key hashes and the ledger are for this user only: the database file is created 0600 (SQLite gives its
    -wal and -shm files the same mode), and one made readable to others by an older version is tightened."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError, PermissionError):
            if stat.S_IMODE(file.stat().st_mode) & 0o077:
                file.chmod(0o600)


class PostgresDatabase:
    """PostgreSQL through psycopg 3 (the `postgres` extra), for several gateways sharing keys and a ledger."""

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError as e:
            raise MissingDependencyError(
                "A PostgreSQL database needs psycopg.", "Install it: pip install 'deploykit[postgres]'."
            ) from e
        self.url = url
        try:
            self._conn = psycopg.connect(url, autocommit=True)
        except psycopg.OperationalError as e:
            raise UsageError(f"Cannot connect to PostgreSQL: {e}".strip(), "Check DEPLOYKIT_DATABASE_URL.") from e
        self._lock = threading.Lock()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._lock:
            return self._conn.execute(_pg(sql), params).rowcount  # type: ignore[arg-type]

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._lock, self._conn.transaction(), self._conn.cursor() as cur:
            cur.executemany(_pg(sql), rows)  # type: ignore[arg-type]

    def atomic(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        with self._lock, self._conn.transaction():
            for sql, params in statements:
                self._conn.execute(_pg(sql), params)  # type: ignore[arg-type]

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._lock:
            return list(self._conn.execute(_pg(sql), params).fetchall())  # type: ignore[arg-type]

    def exclusive(self, work: Callable[[Run], T]) -> T:
        """In PostgreSQL the work itself takes the row locks it needs (an UPDATE of the row first)."""

        def run(sql: str, params: Sequence[Any] = ()) -> list[Row]:
            cursor = self._conn.execute(_pg(sql), params)  # type: ignore[arg-type]
            return list(cursor.fetchall()) if cursor.description else []

        with self._lock, self._conn.transaction():
            return work(run)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _pg(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")
