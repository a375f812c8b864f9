"""The broker's connection caps (`iotbiz.broker.admission`) and server-side keep-alive, through
a real platform: sockets that never send CONNECT are capped per address and closed at once
beyond it, summed up in the log instead of a warning each, while a device from another address
connects; a client asking keep-alive 0 or too much gets the server's maximum."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable

import pytest

from iotbiz.broker.admission import Admission
from iotbiz.names import DeviceName
from iotbiz.platform import Platform
from iotbiz.settings import Settings
from tests.mqtt_device import PahoDevice
from tests.mqtt_wire import connect_packet
from tests.test_dispatch import enroll


def test_admission_caps_in_all_per_address_and_while_pending() -> None:
    admission = Admission(max_total=4, max_per_address=3, max_pending_per_address=2)
    a1, a2 = admission.admit("a"), admission.admit("a")
    assert a1 is not None
    assert a2 is not None
    assert admission.admit("a") is None  # two waiting for their CONNECT already
    a1.connect_read()
    a3 = admission.admit("a")
    assert a3 is not None
    a3.connect_read()
    a2.connect_read()
    assert admission.admit("a") is None  # three open from "a"
    b1 = admission.admit("b")
    assert b1 is not None
    assert admission.admit("c") is None  # four in all
    assert admission.refused == 3
    a1.release()
    a1.release()  # twice: counted once
    assert admission.open == 3
    assert admission.admit("c") is not None


@pytest.fixture
async def platform(make_settings: Callable[..., Settings]) -> AsyncIterator[Platform]:
    running = Platform(
        make_settings(
            http={"host": "127.0.0.1"},
            mqtt={
                "host": "127.0.0.1",
                "connect_timeout_s": 0.5,
                "max_pending_per_address": 3,
                "max_keepalive_s": 20,
            },
        )
    )
    await running.start()
    await running.store.add_customer("abc123", 10, actor="test")
    try:
        yield running
    finally:
        await running.stop()


async def silent_socket(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind(("127.0.0.2", 0))
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def closed_after(sock: socket.socket, timeout_s: float) -> float:
    """Seconds until the broker closes `sock`."""
    started = time.monotonic()
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                if not await asyncio.get_running_loop().sock_recv(sock, 1024):
                    return time.monotonic() - started
            except ConnectionResetError:
                return time.monotonic() - started


async def test_silent_sockets_are_capped_per_address_and_summed_up_in_the_log(
    platform: Platform, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    silent = [await silent_socket(platform.mqtt_port) for _ in range(10)]
    try:
        waits = [await closed_after(sock, 5) for sock in silent]
    finally:
        for sock in silent:
            sock.close()
    over = [wait for wait in waits if wait < 0.3]
    assert len(over) >= 7, waits  # beyond the 3 waiting for their CONNECT: closed at once
    assert max(waits) < 2.5  # the 3 others at the CONNECT timeout (0.5 s)
    # a device from another address was never held up
    name = DeviceName("abc123", "dev-1")
    device = PahoDevice(platform.mqtt_port, str(name), await enroll(platform, name))
    try:
        assert await device.connect() == 0
    finally:
        device.close()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warnings, [r.getMessage() for r in warnings]
    summaries = [r for r in caplog.records if "without a good CONNECT" in r.getMessage()]
    assert len(summaries) <= 2


@pytest.mark.parametrize("asked", [0, 21, 65535])
async def test_a_keepalive_of_none_or_too_much_becomes_the_servers_maximum(
    platform: Platform, asked: int
) -> None:
    name = DeviceName("abc123", f"keep-{asked}")
    password = await enroll(platform, name)
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", platform.mqtt_port))
    try:
        await loop.sock_sendall(sock, connect_packet(str(name), str(name), password, asked))
        async with asyncio.timeout(5):
            assert await loop.sock_recv(sock, 4) == b"\x20\x02\x00\x00"
        assert platform.broker is not None
        session, _ = platform.broker.broker.sessions[str(name)]
        assert session.keep_alive == 20
    finally:
        sock.close()


def test_the_login_brake_doubles_up_to_its_cap_and_forgets_after_its_window() -> None:
    from iotbiz.broker.admission import LoginBrake

    now = [0.0]
    brake = LoginBrake(free=2, max_delay_s=1.0, window_s=60, clock=lambda: now[0])
    assert [brake.refused("a") for _ in range(6)] == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    assert brake.refused("b") == 0.0  # another address
    now[0] = 61.0
    assert brake.refused("a") == 0.0  # a new window
    assert brake.slowed == 4
