"""Hostile raw HTTP requests (hypothesis, `tests/fuzz_http.py`) against a real platform while a
device stays connected over MQTT: every answer is documented (below 500, errors in the JSON
shape) or a closed connection, nothing hangs, and the device is still served afterwards.
`scripts/fuzz.py` runs the same with many more cases."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings

from iotbiz.settings import Settings
from tests.fuzz_http import Case, check_answer, exchange, requests
from tests.processes import enroll_device
from tests.registrar.admin_helpers import TOKEN
from tests.registrar.test_admin_openapi import PlatformThread


@pytest.fixture
def live(make_settings: Callable[..., Settings]) -> Iterator[PlatformThread]:
    with PlatformThread(fuzz_settings(make_settings)) as thread:
        yield thread


def fuzz_settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(
        admin={"token": TOKEN},
        registrar={"rate_per_ip": 0.0},
        http={"host": "127.0.0.1", "header_timeout_s": 0.5, "body_timeout_s": 0.5},
        mqtt={"host": "127.0.0.1"},
    )


class ConnectedDevice:
    """A device connected over MQTT (paho) for the whole run."""

    def __init__(self, url: str, mqtt_port: int) -> None:
        self.customer = "abc123"
        self.device = "fuzz-device"
        password = enroll_device(url, self.customer, self.device)
        name = f"{self.customer}/{self.device}"
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311
        )
        self.client.username_pw_set(name, password)
        self.disconnects = 0
        self.connected = threading.Event()
        self.client.on_connect = lambda *_: self.connected.set()
        self.client.on_disconnect = self._lost
        self.client.connect("127.0.0.1", mqtt_port)
        self.client.loop_start()
        assert self.connected.wait(10), "the device did not connect"

    def _lost(self, *_: Any) -> None:
        self.disconnects += 1

    def still_served(self) -> None:
        assert self.client.is_connected()
        assert self.disconnects == 0
        info = self.client.publish(
            f"devices/{self.customer}/{self.device}/telemetry", b'{"cpu_percent": 1}', qos=1
        )
        info.wait_for_publish(10)
        assert info.is_published()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class ErrorLines(logging.Handler):
    """Counts WARNING-or-worse log records: a hostile request must not cost a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def run_fuzz(live: PlatformThread, examples: int) -> Counter[int]:
    """Run `examples` cases against `live` with a device connected; the statuses seen. No case
    may log a warning or an error."""
    assert live.platform is not None
    device = ConnectedDevice(live.url, live.platform.mqtt_port)
    statuses: Counter[int] = Counter()
    port = live.platform.http_port
    errors = ErrorLines()
    root = logging.getLogger()
    root.addHandler(errors)
    try:

        @given(case=requests(token=TOKEN))
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def one(case: Case) -> None:
            statuses[check_answer(case, exchange(port, case))] += 1

        one()
        device.still_served()
        logged = [f"{r.name}: {r.getMessage()}" for r in errors.records]
        assert not logged, f"{len(logged)} warnings or errors logged, the first: {logged[:3]}"
    finally:
        root.removeHandler(errors)
        device.close()
    return statuses


@pytest.mark.timeout(120)
def test_hostile_requests_get_documented_answers_and_a_device_stays_served(
    live: PlatformThread,
) -> None:
    started = time.monotonic()
    statuses = run_fuzz(live, examples=300)
    assert sum(statuses.values()) >= 300
    assert len(statuses) >= 4, statuses  # the cases reach more than one kind of answer
    assert time.monotonic() - started < 90
