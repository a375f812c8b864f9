"""Refused MQTT logins tell nothing and cost the log nothing: an unknown device and a known one
with a wrong password cost the same bcrypt check and get the same CONNACK; a flood of refusals
is summed up in one INFO line per period, not a line each."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from iotbiz.names import DeviceName
from iotbiz.platform import Platform
from tests.mqtt_device import PahoDevice
from tests.test_dispatch import enroll


async def refused(platform: Platform, username: str) -> int:
    device = PahoDevice(platform.mqtt_port, username, "x" * 32)
    try:
        return await device.connect()
    finally:
        device.close()


async def test_unknown_and_known_devices_are_refused_alike(platform: Platform) -> None:
    known = DeviceName("abc123", "dev-known")
    await enroll(platform, known)
    hasher = platform._hasher
    assert hasher is not None
    codes, costs = [], []
    for username in ("abc123/dev-unknown", str(known), "nobody-account"):
        before = hasher.operations
        codes.append(await refused(platform, username))
        costs.append(hasher.operations - before)
    assert codes == [135, 135, 135]  # paho maps CONNACK 5 (not authorized) to reason 135
    assert costs == [1, 1, 1]  # one bcrypt check each, the decoy's for the unknown ones


async def test_a_flood_of_bad_logins_is_summed_up_in_the_log(
    platform: Platform, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="iotbiz.broker.authority")
    codes = await asyncio.gather(*(refused(platform, f"abc123/flood-{i}") for i in range(30)))
    assert codes == [135] * 30
    lines = [r for r in caplog.records if r.name == "iotbiz.broker.authority"]
    assert len(lines) <= 2, [r.getMessage() for r in lines]
    assert platform.authority is not None
    assert platform.authority.refused_logins == 30


async def test_refusals_from_one_address_are_slowed_down_right_logins_are_not(
    platform: Platform,
) -> None:
    """After `mqtt.login_failures_free` (10) refusals from one address, each further one waits
    before its CONNACK; a device with the right password from that address is not held up."""
    for index in range(10):
        assert await refused(platform, f"abc123/guess-{index}") == 135
    started = time.monotonic()
    assert await refused(platform, "abc123/guess-10") == 135
    assert time.monotonic() - started >= 0.2  # the first wait: 0.25 s
    name = DeviceName("abc123", "dev-right")
    device = PahoDevice(platform.mqtt_port, str(name), await enroll(platform, name))
    started = time.monotonic()
    try:
        assert await device.connect() == 0
    finally:
        device.close()
    assert time.monotonic() - started < 0.2
    assert platform.broker is not None
    assert platform.broker.broker.login_brake.slowed == 1
