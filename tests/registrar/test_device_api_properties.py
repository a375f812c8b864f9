"""Property tests: whatever body arrives, the device API answers in its documented shape.

The registrar runs on a real server in a background thread with its own event loop (hypothesis
drives a synchronous test), over a real SQLite file.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotbiz.names import normalize_device_id
from iotbiz.registrar import create_app
from iotbiz.settings import load_settings
from iotbiz.store import Store
from tests.processes import post_json

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children),
    max_leaves=8,
)
ids = st.text(max_size=70) | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9:_.\-/+# ]{0,66}", fullmatch=True)
bodies = st.fixed_dictionaries(
    {},
    optional={"customer_id": ids | json_values, "mac_address": ids | json_values, "x": json_values},
)


@pytest.fixture(scope="module")
def registrar_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    loop = asyncio.new_event_loop()
    started = threading.Event()
    state: dict[str, Any] = {}

    async def start() -> None:
        path: Path = tmp_path_factory.mktemp("props") / "iotbiz.db"
        store = await Store.open(path)
        await store.add_customer("abc123", 1_000_000, actor="test")
        settings = load_settings(
            None, environ={}, overrides={"store": {"path": path}, "registrar": {"rate_per_ip": 0}}
        )
        runner = web.AppRunner(create_app(settings, store))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        state.update(store=store, runner=runner, port=runner.addresses[0][1])
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    started.wait(30)
    try:
        yield f"http://127.0.0.1:{state['port']}"
    finally:

        async def stop() -> None:
            await state["runner"].cleanup()
            await state["store"].close()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies)
def test_register_answers_every_body_in_shape(registrar_url: str, body: dict[str, Any]) -> None:
    status, answer = post_json(registrar_url + "/api/v1/register", body)
    customer, device = body.get("customer_id"), body.get("mac_address")
    if status == 201:
        assert isinstance(customer, str)
        assert isinstance(device, str)
        assert normalize_device_id(device) is not None
        assert list(answer) == ["password"]
    else:
        assert status in (400, 403), (status, answer)
        assert list(answer) == ["error"]
        assert isinstance(answer["error"], str)
    if isinstance(device, str) and normalize_device_id(device) is None:
        assert status == 400  # nothing that could break a topic ACL is ever stored


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies, password=json_values)
def test_activate_answers_every_body_in_shape(
    registrar_url: str, body: dict[str, Any], password: Any
) -> None:
    status, answer = post_json(registrar_url + "/api/v1/activate", {**body, "password": password})
    assert status in (400, 403), (status, answer)
    assert list(answer) == ["error"]


@settings(max_examples=50, deadline=None)
@given(raw=st.binary(max_size=600))
def test_any_bytes_get_json_errors(registrar_url: str, raw: bytes) -> None:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(  # noqa: S310 - the test's own loopback server
        registrar_url + "/api/v1/register", data=raw, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            status, data = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, data = exc.code, exc.read()
    answer = json.loads(data)
    if status != 201:
        assert status in (400, 403)
        assert list(answer) == ["error"]
