"""/metrics: the fleet from the store (cached), HTTP requests by canonical route, enrollments,
the event loop's lag; MQTT counters through a real platform."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from iotbiz.names import DeviceName
from iotbiz.platform import Platform
from iotbiz.registrar import create_app
from iotbiz.registrar.keys import METRICS
from iotbiz.settings import Settings
from iotbiz.store import Store
from tests.mqtt_device import PahoDevice
from tests.registrar.admin_helpers import ADMIN, AUTH, TOKEN, Client, enroll, platform
from tests.store_helpers import active_devices

__all__ = ["platform"]  # the fixture, used by name


@pytest.fixture
async def admin(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings], store: Store
) -> Client:
    client: Client = await aiohttp_client(
        create_app(make_settings(admin={"token": TOKEN}), store), headers=AUTH
    )
    return client


async def scrape(client: Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of /metrics: (name, sorted labels) -> value."""
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_fleet_http_and_enrollment_metrics(admin: Client, store: Store) -> None:
    await active_devices(store, "abc123", 3)
    await store.register_device(DeviceName("abc123", "pending-1"), b"h", ttl_s=60, actor="t")
    await store.revoke_device(DeviceName("abc123", "dev-00000"), actor="test")
    assert (await admin.get(f"{ADMIN}/devices/abc123/dev-00001")).status == 200
    assert (await admin.get(f"{ADMIN}/devices/abc123/dev-00002")).status == 200
    assert (await admin.get(f"{ADMIN}/devices/abc123/nope")).status == 404
    assert (await admin.get("/no/such/path/123")).status == 404
    body = {"customer_id": "abc123", "mac_address": "dev-new"}
    assert (await admin.post("/api/v1/register", json=body)).status == 201
    body = {"customer_id": "nobody", "mac_address": "dev-new"}
    assert (await admin.post("/api/v1/register", json=body)).status == 403
    assert (await admin.post("/api/v1/register", data=b"{")).status == 400

    samples = await scrape(admin)
    assert samples[("iotbiz_devices", (("state", "active"),))] == 2
    assert samples[("iotbiz_devices", (("state", "pending"),))] == 2  # pending-1, dev-new
    assert samples[("iotbiz_devices", (("state", "revoked"),))] == 1
    for state in ("queued", "sent", "done", "failed", "expired"):  # no command sent yet
        assert samples[("iotbiz_commands", (("state", state),))] == 0
    assert samples[("iotbiz_devices_online", ())] == 0
    assert samples[("iotbiz_store_up", ())] == 1
    device_route = "/api/v1/admin/devices/{customer_id}/{device_id}"
    key = ("method", "GET"), ("route", device_route), ("status", "200")
    assert samples[("iotbiz_http_requests_total", key)] == 2
    key = ("method", "GET"), ("route", device_route), ("status", "404")
    assert samples[("iotbiz_http_requests_total", key)] == 1
    key = ("method", "GET"), ("route", "unmatched"), ("status", "404")
    assert samples[("iotbiz_http_requests_total", key)] == 1
    routes = {dict(labels).get("route") for (name, labels) in samples if "http" in name}
    assert not any("dev-0000" in str(route) or "no/such" in str(route) for route in routes)
    enrollments = {
        dict(labels)["outcome"]: value
        for (name, labels), value in samples.items()
        if name == "iotbiz_enrollments_total"
    }
    assert enrollments == {"ok": 1, "refused": 1, "bad_request": 1}


async def test_unknown_methods_share_one_label(admin: Client) -> None:
    response = await admin.request("PROPFIND", f"{ADMIN}/customers")
    assert response.status == 405
    samples = await scrape(admin)
    methods = {dict(labels).get("method") for (name, labels) in samples if "http_requests" in name}
    assert "PROPFIND" not in methods
    assert "other" in methods


async def test_a_scrape_storm_reads_the_store_once(admin: Client, store: Store) -> None:
    await active_devices(store, "abc123", 2)
    counts = admin.app[METRICS].store_counts
    responses = await asyncio.gather(*(admin.get("/metrics") for _ in range(30)))
    assert {response.status for response in responses} == {200}
    assert counts.reads == 1  # cached for STORE_CACHE_S: one read for all of them


async def test_a_failing_store_keeps_the_scrape_going(admin: Client, store: Store) -> None:
    await store.close()
    samples = await scrape(admin)
    assert samples[("iotbiz_store_up", ())] == 0
    assert ("iotbiz_event_loop_lag_seconds", ()) in samples


async def test_the_event_loop_lag(admin: Client) -> None:
    """Block the loop (which the server shares with this test) for 0.8 s, longer than the
    probe's interval: whenever the probe was due, it wakes at least 0.3 s late."""
    time.sleep(0.8)
    worst = 0.0
    for _ in range(50):
        samples = await scrape(admin)
        worst = max(worst, samples[("iotbiz_event_loop_lag_max_seconds", ())])
        if worst >= 0.25:
            break
        await asyncio.sleep(0.05)
    assert worst >= 0.25


async def test_mqtt_connections_and_refused_logins_through_a_real_platform(
    platform: Platform,
) -> None:
    async with aiohttp.ClientSession(
        f"http://127.0.0.1:{platform.http_port}", headers=AUTH
    ) as session:

        async def mqtt_samples() -> dict[str, float]:
            async with session.get("/metrics") as response:
                assert response.status == 200
                text = await response.text()
            return {
                sample.name: sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name.startswith("iotbiz_mqtt_")
            }

        before = await mqtt_samples()
        assert before["iotbiz_mqtt_connections"] >= 1  # the platform's own service client
        assert before["iotbiz_mqtt_refused_logins_total"] == 0
        intruder = PahoDevice(platform.mqtt_port, "abc123/nobody", "wrong-password")
        try:
            assert await intruder.connect() != 0
        finally:
            intruder.close()
        password = await enroll(session, "dev-1")
        device = PahoDevice(platform.mqtt_port, "abc123/dev-1", password)
        try:
            assert await device.connect() == 0
            after = await mqtt_samples()
        finally:
            device.close()
    assert after["iotbiz_mqtt_refused_logins_total"] == 1
    assert after["iotbiz_mqtt_connections"] == before["iotbiz_mqtt_connections"] + 1
    assert "iotbiz_mqtt_denied_publishes_total" in after
    assert "iotbiz_mqtt_busy_refusals_total" in after
