"""The gateway in front of the fake engine, both in-process (httpx ASGI transports on each side), with a
real SQLite database for keys and the ledger."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from deploykit.serve.accounting.database import Database, connect
from deploykit.serve.gateway import Backend, create_app
from deploykit.serve.gateway.app import Gateway, GatewayOptions
from deploykit.serve.gateway.proxy import engine_session
from tests.unit.gateway_support import client_of


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = connect(f"sqlite:///{tmp_path / 'deploykit.db'}")
    yield database
    database.close()


@pytest.fixture
async def backend(engine_url: str) -> AsyncIterator[Backend]:
    async with engine_session() as session:
        yield Backend("m1", engine_url, session, status="ready")


@pytest.fixture
def make_app(backend: Backend, db: Database) -> Iterator[Callable[..., FastAPI]]:
    """Build gateway apps (options as keywords of GatewayOptions); each one's ledger is flushed at the end."""
    apps: list[FastAPI] = []

    def make(**options: object) -> FastAPI:
        apps.append(create_app([backend], db, GatewayOptions(**options)))  # type: ignore[arg-type]
        return apps[-1]

    yield make
    for app in apps:
        app.state.gateway.close()


@pytest.fixture
def app(make_app: Callable[..., FastAPI]) -> FastAPI:
    return make_app()


@pytest.fixture
def state(app: FastAPI) -> Gateway:
    gateway: Gateway = app.state.gateway
    return gateway


@pytest.fixture
async def gateway(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(app) as client:
        yield client
