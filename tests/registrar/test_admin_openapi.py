"""The OpenAPI document matches the router exactly, documents every status with its schema, and
holds up against schemathesis run over a real platform (no 500, statuses and bodies as
documented)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

from iotbiz.platform import Platform
from iotbiz.registrar import create_app
from iotbiz.registrar.openapi import document
from iotbiz.settings import Settings
from iotbiz.store import Store
from tests.registrar.admin_helpers import AUTH, TOKEN, Client, ok_json
from tests.store_helpers import active_devices

METHODS = {"get", "post", "patch", "put", "delete"}
# answers that never end (tested in tests/registrar/test_fleet_feed.py): schemathesis would wait
ENDLESS = {"/api/v1/admin/stream"}


def routes_of(settings: Settings, store: Store) -> set[tuple[str, str]]:
    app = create_app(settings, store)
    found = set()
    for route in app.router.routes():
        if route.method == "HEAD":  # aiohttp adds HEAD to every GET route
            continue
        resource = route.resource
        assert resource is not None
        found.add((route.method.lower(), resource.canonical))
    return found


def documented() -> set[tuple[str, str]]:
    return {
        (method, path)
        for path, item in document()["paths"].items()
        for method in item
        if method in METHODS
    }


async def test_the_document_matches_the_router(
    make_settings: Callable[..., Settings], store: Store
) -> None:
    routes = routes_of(make_settings(), store)
    assert routes - documented() == set(), "routes missing from the OpenAPI document"
    assert documented() - routes == set(), "documented operations the router does not have"


def test_every_error_is_the_error_schema_and_every_admin_route_needs_the_token() -> None:
    doc = document()
    responses = doc["components"]["responses"]
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["error"]
    assert error["properties"] == {"error": {"type": "string"}}
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method not in METHODS:
                continue
            statuses = operation["responses"]
            assert any(s.startswith("2") for s in statuses), (method, path)
            for status, answer in statuses.items():
                if status.startswith(("4", "5")):
                    assert answer == {"$ref": f"#/components/responses/Error{status}"}
                    assert responses[f"Error{status}"]["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"
                    }
            if path.startswith("/api/v1/admin/"):
                assert operation["security"] == [{"adminToken": []}, {"consoleSession": []}], (
                    method,
                    path,
                )
                if method != "get":
                    assert "403" in statuses  # a console session's change without CSRF token
                assert "401" in statuses
                assert "400" in statuses  # unknown query parameters, at least
                assert "503" in statuses  # the store
            if "requestBody" in operation:
                assert "413" in statuses or not path.startswith("/api/v1/admin/")


async def test_the_document_is_served_without_auth(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings], store: Store
) -> None:
    client: Client = await aiohttp_client(create_app(make_settings(admin={"token": TOKEN}), store))
    served = await ok_json(await client.get("/api/v1/openapi.json"))
    assert served == document()
    assert served["openapi"].startswith("3.1")


# -- schemathesis over a real platform -------------------------------------------------------


class PlatformThread:
    """A real platform (broker, registrar, store) on ports 0 in a thread with its own event
    loop, so that schemathesis (synchronous, requests) can call it."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.platform: Platform | None = None

    def run(self, coro: Any, timeout_s: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def __enter__(self) -> PlatformThread:
        self._thread.start()

        async def start() -> Platform:
            platform = Platform(self._settings)
            await platform.start()
            await active_devices(platform.store, "abc123", 3)
            return platform

        self.platform = self.run(start())
        return self

    @property
    def url(self) -> str:
        assert self.platform is not None
        return f"http://127.0.0.1:{self.platform.http_port}"

    def __exit__(self, *exc: object) -> None:
        if self.platform is not None:
            self.run(self.platform.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def live(make_settings: Callable[..., Settings], tmp_path: Path) -> Iterator[PlatformThread]:
    settings = make_settings(
        admin={"token": TOKEN},
        registrar={"rate_per_ip": 0.0},  # schemathesis is one client making many requests
        mqtt={"host": "127.0.0.1"},
    )
    with PlatformThread(settings) as thread:
        yield thread


@pytest.mark.timeout(120)
def test_schemathesis_finds_no_500_and_nothing_undocumented(live: PlatformThread) -> None:
    schema = schemathesis.openapi.from_url(f"{live.url}/api/v1/openapi.json")
    checks = [not_a_server_error, status_code_conformance, response_schema_conformance]
    started = time.monotonic()
    tested = set()
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in ENDLESS:
            continue
        tested.add((operation.method.lower(), operation.path))

        # valid inputs and invalid ones (which must be refused as documented, not a 500)
        strategy = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(
            GenerationMode.NEGATIVE
        )

        @given(case=strategy)
        @settings(
            max_examples=40,  # about half of them invalid
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            nonlocal calls
            calls += 1
            case.call_and_validate(base_url=live.url, headers=AUTH, checks=checks)

        check()
    # schemathesis leaves out the document's own URL
    assert tested == documented() - {("get", "/api/v1/openapi.json")} - {
        ("get", path) for path in ENDLESS
    }
    assert calls >= 10 * len(tested)
    assert time.monotonic() - started < 90
