"""The device API while the store fails: a clear 503 `{"error": ...}`, never a traceback or a
hang, and back to normal once the store works again."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from iotbiz.registrar import create_app
from iotbiz.settings import Settings
from iotbiz.store import Store
from tests.registrar.test_device_api import Client, activate, assert_error, register
from tests.test_store_failures import SmallDisk, small_disk

__all__ = ["small_disk"]  # the fixture, used by name

STORE_DOWN = "store unavailable, try again later"


async def registrar_on(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings], store: Store
) -> Client:
    await store.add_customer("abc123", 10, actor="test")
    client: Client = await aiohttp_client(create_app(make_settings(), store))
    return client


async def test_a_full_disk_answers_503_then_recovers(
    aiohttp_client: Callable[..., Any],
    make_settings: Callable[..., Settings],
    small_disk: SmallDisk,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = await Store.open(small_disk.folder / "iotbiz.db")
    try:
        client = await registrar_on(aiohttp_client, make_settings, store)
        small_disk.fill()
        for mac in ("dev-1", "dev-2"):
            await assert_error(await register(client, mac), 503, STORE_DOWN)
        assert "Traceback" not in caplog.text
        [warning] = [r for r in caplog.records if r.name == "iotbiz.registrar.middlewares"]
        assert "database or disk is full" in warning.getMessage()  # one line, not one a request
        small_disk.make_room()
        response = await register(client, "dev-1")
        assert response.status == 201
        password = (await response.json())["password"]
        assert (await activate(client, password, "dev-1")).status == 200
    finally:
        await store.close()


async def test_a_closed_store_answers_503(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings], store: Store
) -> None:
    client = await registrar_on(aiohttp_client, make_settings, store)
    await store.close()
    await assert_error(await register(client, "dev-1"), 503, STORE_DOWN)
    await assert_error(await activate(client, "x" * 20, "dev-1"), 503, STORE_DOWN)
