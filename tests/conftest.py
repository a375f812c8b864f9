"""Shared fixtures: a real SQLite store in tmp_path, a real registrar on 127.0.0.1, a test clock."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient

from iotbiz.registrar import create_app
from iotbiz.settings import Settings, load_settings
from iotbiz.store import Store
from iotbiz.store.interface import PlatformStore
from iotbiz.store.postgres import PostgresStore
from tests.services.postgres import PostgresServer, ServiceUnavailable


class FakeClock:
    """A wall clock the test moves by hand (the only thing these tests mock)."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "iotbiz.db"


@pytest.fixture
def make_settings(db_path: Path) -> Callable[..., Settings]:
    """Settings for a test: the store in tmp_path, port 0, plus any {section: {key: value}}."""

    def make(**sections: dict[str, Any]) -> Settings:
        overrides: dict[str, dict[str, Any]] = {
            "store": {"path": db_path},
            "http": {"port": 0},
            "mqtt": {"port": 0, "mqtts_port": 0},
        }
        for section, values in sections.items():
            overrides.setdefault(section, {}).update(values)
        return load_settings(None, environ={}, overrides=overrides)

    return make


@pytest_asyncio.fixture
async def store(db_path: Path, clock: FakeClock) -> AsyncIterator[Store]:
    opened = await Store.open(db_path, clock=clock)
    yield opened
    await opened.close()


@pytest_asyncio.fixture
async def client(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings], store: Store
) -> TestClient[Any, Any]:
    """A real registrar on 127.0.0.1 (free port) over the real store; a customer `abc123`
    with a limit of 10 exists."""
    await store.add_customer("abc123", 10, actor="test")
    result: TestClient[Any, Any] = await aiohttp_client(create_app(make_settings(), store))
    return result


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A private PostgreSQL server for the session (see tests/services/postgres.py). A server
    that cannot start fails the tests that need it, with the reason: it never skips them."""
    try:
        server = PostgresServer.start()
    except ServiceUnavailable as exc:
        pytest.fail(f"cannot start a private PostgreSQL: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest_asyncio.fixture
async def postgres_url(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """The URL (with its password) of a new, empty database on the session's server."""
    url = await postgres_server.create_database()
    yield url
    await postgres_server.drop_database(url)


@pytest_asyncio.fixture(params=["sqlite", "postgresql"])
async def any_store(
    request: pytest.FixtureRequest, db_path: Path, clock: FakeClock
) -> AsyncIterator[PlatformStore]:
    """The store on each backend: SQLite in tmp_path, PostgreSQL in a fresh database (both
    have every operation: iotbiz.store.interface.PlatformStore)."""
    opened: PlatformStore
    if request.param == "sqlite":
        opened = await Store.open(db_path, clock=clock)
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        url = await server.create_database()
        opened = await PostgresStore.open(url, clock=clock)
    yield opened
    await opened.close()
    if request.param == "postgresql":
        await server.drop_database(url)
