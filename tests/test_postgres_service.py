"""The private PostgreSQL the store tests run on: it starts, gives each test its own database,
accepts only its password, and a server that cannot start says why (the fixture then fails)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import asyncpg
import pytest

from tests.services.postgres import PostgresServer, ServiceUnavailable

pytestmark = pytest.mark.timeout(60)


async def test_a_fresh_database_is_empty_and_writable(postgres_url: str) -> None:
    conn = await asyncpg.connect(postgres_url, timeout=10)
    try:
        tables = await conn.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
        assert tables == 0
        await conn.execute("CREATE TABLE t (x int)")
        await conn.execute("INSERT INTO t VALUES (1)")
        assert await conn.fetchval("SELECT x FROM t") == 1
    finally:
        await conn.close()


async def test_each_test_gets_its_own_database(postgres_url: str) -> None:
    # The previous test created table t in its database; this one does not see it.
    conn = await asyncpg.connect(postgres_url, timeout=10)
    try:
        assert await conn.fetchval("SELECT to_regclass('public.t') IS NULL")
    finally:
        await conn.close()


async def test_listens_on_loopback_only_with_its_password(
    postgres_server: PostgresServer,
) -> None:
    conn = await asyncpg.connect(postgres_server.url(), timeout=10)
    try:
        assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
        assert await conn.fetchval("SHOW unix_socket_directories") == str(
            postgres_server.socket_dir
        )
    finally:
        await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(postgres_server.url(password="wrong"), timeout=10)


def test_missing_postgresql_is_an_error_naming_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ServiceUnavailable, match="run scripts/services-setup"):
        PostgresServer.start(bin_dir=tmp_path)


def test_a_broken_installation_is_an_error_with_the_reason() -> None:
    # Not in tmp_path: when the tests run as root the tools run as `postgres`, who cannot
    # enter pytest's private folders.
    with tempfile.TemporaryDirectory() as folder:
        bin_dir = Path(folder)
        bin_dir.chmod(0o755)
        _broken_tools(bin_dir)
        with pytest.raises(
            ServiceUnavailable, match=r"initdb failed \(exit 3\): broken on purpose"
        ):
            PostgresServer.start(bin_dir=bin_dir)


def _broken_tools(tmp_path: Path) -> None:
    for tool in ("initdb", "pg_ctl", "postgres"):
        script = tmp_path / tool
        script.write_text("#!/bin/sh\necho 'broken on purpose' >&2\nexit 3\n")
        script.chmod(0o755)
