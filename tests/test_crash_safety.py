"""The platform SIGKILLed in the middle of a registration storm and of an activation storm,
then started again on the same store: the store is consistent (the limit holds, nothing is
half-registered), every device that was told 201 then 200 still connects over MQTT, and every
other device can enroll by simply trying again."""

from __future__ import annotations

import json
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from tests.processes import PlatformProcess, platform_process, post_json, run_cli

CUSTOMER = "crash"
LIMIT = 60
DEVICES = 90  # more than the limit: the storm also runs into it
KILL_AFTER = 25  # answers seen before the SIGKILL


def mac(index: int) -> str:
    return f"44:8a:5b:00:{index // 256:02x}:{index % 256:02x}"


class Storm:
    """Registers (and activates) devices from 12 threads until told to stop; records what the
    platform answered, which is what a device would have believed."""

    def __init__(self, platform: PlatformProcess, *, activate: bool) -> None:
        self.url = platform.url
        self.activate = activate
        self.lock = threading.Lock()
        self.passwords: dict[int, str] = {}  # 201 received
        self.activated: set[int] = set()  # 201 then 200 received
        self.answers = 0
        self.enough = threading.Event()

    def one(self, index: int) -> None:
        body: dict[str, Any] = {"customer_id": CUSTOMER, "mac_address": mac(index)}
        try:
            status, answer = post_json(self.url + "/api/v1/register", body)
            if status == 201:
                with self.lock:
                    self.passwords[index] = answer["password"]
                if self.activate:
                    body["password"] = answer["password"]
                    status, _ = post_json(self.url + "/api/v1/activate", body)
                    if status == 200:
                        with self.lock:
                            self.activated.add(index)
        except OSError:
            return  # the platform died under it: the device would simply retry later
        with self.lock:
            self.answers += 1
            if self.answers >= KILL_AFTER:
                self.enough.set()

    def run_until_killed(self, platform: PlatformProcess) -> None:
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(self.one, index) for index in range(DEVICES)]
            assert self.enough.wait(60), "the storm did not get going"
            platform.proc.send_signal(signal.SIGKILL)
            platform.proc.wait(timeout=10)
            for future in futures:
                future.result(timeout=60)


def connects(port: int, index: int, password: str) -> int:
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"{CUSTOMER}/{mac(index)}",
        protocol=mqtt.MQTTv311,
    )
    codes: list[int] = []
    done = threading.Event()

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        codes.append(reason.value)
        done.set()

    client.on_connect = on_connect
    client.username_pw_set(f"{CUSTOMER}/{mac(index)}", password)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert done.wait(10), "no CONNACK"
        return codes[0]
    finally:
        client.loop_stop()
        client.disconnect()


def check_after_restart(tmp_path: Path, db: Path, storm: Storm) -> None:
    with platform_process(tmp_path, "--db", str(db)) as platform:
        listing = run_cli("customer", "list", "--db", str(db), "--json")
        assert listing.returncode == 0, listing.stderr
        (customer,) = json.loads(listing.stdout)
        # the limit held through the crash
        assert customer["active_devices"] + customer["pending_devices"] <= LIMIT, customer
        # every device that was told 201 then 200 logs in with its password
        for index in sorted(storm.activated):
            assert connects(platform.mqtt_port, index, storm.passwords[index]) == 0, index
        # every other device enrolls by trying again, until the limit
        enrolled = len(storm.activated)
        for index in range(DEVICES):
            if index in storm.activated:
                continue
            body: dict[str, Any] = {"customer_id": CUSTOMER, "mac_address": mac(index)}
            password = storm.passwords.get(index)
            if password is not None:  # it had a 201: its activation may have landed or not
                status, _ = post_json(
                    platform.url + "/api/v1/activate", {**body, "password": password}
                )
                if status == 200:
                    enrolled += 1
                    continue
            status, answer = post_json(platform.url + "/api/v1/register", body)
            if status == 403:
                assert answer == {"error": "device limit reached"}, (index, answer)
                continue
            assert status == 201, (index, status, answer)
            body["password"] = answer["password"]
            status, answer = post_json(platform.url + "/api/v1/activate", body)
            assert status == 200, (index, status, answer)
            enrolled += 1
        assert (
            enrolled == LIMIT
        )  # the limit is reached exactly: nothing half-registered held a place
        assert platform.stop() == 0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("activate", [False, True], ids=["registration", "activation"])
def test_sigkill_during_an_enrollment_storm_leaves_a_consistent_store(
    tmp_path: Path, activate: bool
) -> None:
    db = tmp_path / "iotbiz.db"
    assert (
        run_cli("customer", "add", CUSTOMER, "--limit", str(LIMIT), "--db", str(db)).returncode == 0
    )
    storm: Storm
    with platform_process(tmp_path, "--db", str(db)) as platform:
        storm = Storm(platform, activate=activate)
        storm.run_until_killed(platform)
    assert storm.passwords, "no registration got through before the kill"
    if activate:
        assert storm.activated, "no activation got through before the kill"
    check_after_restart(tmp_path, db, storm)
