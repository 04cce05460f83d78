"""Fixtures shared by unit and integration tests: the fake engine over real HTTP."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import deploykit
from tests.fakes.engine import create_fake_engine
from tests.fakes.threaded import serve_in_thread

if "MUTANT_UNDER_TEST" in os.environ:  # under mutmut (tests/mutants.py): processes the tests start run the
    os.environ["PYTHONPATH"] = str(Path(deploykit.__file__).resolve().parents[1])  # mutated copy too


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def engine_url() -> Iterator[str]:
    """The fake engine serving m1, over real HTTP (the gateway's engine client is aiohttp)."""
    with serve_in_thread(create_fake_engine("m1")) as url:
        yield url


@pytest.fixture(scope="session")
def slow_engine_url() -> Iterator[str]:
    """The fake engine serving m1 at 20 ms a token."""
    with serve_in_thread(create_fake_engine("m1", token_delay=0.02)) as url:
        yield url
