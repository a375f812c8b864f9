"""The console's rollouts pages in a real browser against the real platform: a rollout started
through the admin API shows in the list and on its page, Abort on the page ends it (the API says
aborted); the start form shows the API's error, starts a rollout, and its page follows a change
made elsewhere while it runs. The devices are enrolled but offline, so a rollout stays running
(its first update command queued) until it is aborted."""

from __future__ import annotations

import io
import json
import queue
import re
import tarfile
import urllib.request
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from playwright.sync_api import Page, expect

from tests.console.conftest import CUSTOMER, TOKEN, admin
from tests.processes import PlatformProcess, enroll_device

pytestmark = pytest.mark.timeout(60)

APP, VERSION = "web", "2.0"


def artifact() -> bytes:
    """A small real .tar.gz holding one file."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        data = b"print('web 2.0')\n"
        info = tarfile.TarInfo("app.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def release(console_platform: PlatformProcess) -> None:
    request = urllib.request.Request(  # noqa: S310 - loopback
        f"{console_platform.url}/api/v1/admin/releases?app={APP}&version={VERSION}",
        data=artifact(),
        method="POST",
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/gzip"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
        assert response.status == 201, response.read()


def enrolled(platform: PlatformProcess, *device_ids: str) -> list[str]:
    for device_id in device_ids:
        enroll_device(platform.url, CUSTOMER, device_id)
    return [f"{CUSTOMER}/{device_id}" for device_id in device_ids]


def start(platform: PlatformProcess, devices: list[str]) -> dict[str, Any]:
    body = {"app": APP, "version": VERSION, "devices": devices, "batch_size": 1}
    status, rollout = admin(platform, "POST", "/rollouts", body)
    assert status == 201, rollout
    assert rollout["state"] == "running"
    return dict(rollout)


def test_a_rollout_shows_in_the_list_and_abort_on_its_page_ends_it(
    console: Page, console_platform: PlatformProcess, release: None
) -> None:
    devices = enrolled(console_platform, "roll-a1", "roll-a2", "roll-a3")
    older = start(console_platform, devices[:1])
    rollout = start(console_platform, devices[1:])
    page = console
    page.goto("/#/fleet")
    page.get_by_test_id("nav-rollouts").click()
    expect(page.get_by_test_id("rollouts-table")).to_have_attribute("data-loaded", "true")
    rows = page.get_by_test_id("rollout-row")
    expect(rows.first).to_have_attribute("data-id", rollout["id"])  # newest first
    expect(rows.nth(1)).to_have_attribute("data-id", older["id"])
    row = rows.first
    expect(row.get_by_test_id("rollout-app")).to_have_text(APP)
    expect(row.get_by_test_id("rollout-version")).to_have_text(VERSION)
    expect(row.get_by_test_id("rollout-state")).to_have_text("running")
    progress = row.get_by_test_id("rollout-progress")
    expect(progress).to_have_attribute("data-total", "2")
    expect(progress).to_have_attribute("data-committed", "0")
    expect(row.get_by_test_id("rollout-progress-text")).to_have_text("0/2 committed")

    row.get_by_test_id("rollout-link").click()
    expect(page).to_have_url(f"{console_platform.url}/#/rollouts/{rollout['id']}")
    expect(page.get_by_test_id("rollout-id")).to_have_text(rollout["id"])
    expect(page.get_by_test_id("rollout-figures")).to_have_attribute("data-state", "running")
    expect(page.get_by_test_id("rollout-release")).to_have_text(f"{APP} {VERSION}")
    expect(page.get_by_test_id("rollout-batch")).to_have_text("1/2")
    expect(page.get_by_test_id("rollout-total")).to_have_text("2")
    first, second = (
        page.locator(f'[data-testid="rollout-device"][data-name="{name}"]') for name in devices[1:]
    )
    expect(first).to_have_attribute("data-result", "updating")  # batch 1, its command queued
    expect(second).to_have_attribute("data-result", "waiting")
    expect(page.get_by_test_id("main")).not_to_contain_text("null")  # no reason yet: none shown

    page.get_by_test_id("rollout-abort").click()
    page.get_by_test_id("confirm-ok").click()
    expect(page.get_by_test_id("rollout-figures")).to_have_attribute("data-state", "aborted")
    expect(page.get_by_test_id("rollout-abort")).to_have_count(0)
    expect(first).to_have_attribute("data-result", "skipped")
    expect(second).to_have_attribute("data-result", "skipped")
    status, shown = admin(console_platform, "GET", f"/rollouts/{rollout['id']}")
    assert status == 200
    assert shown["state"] == "aborted"
    assert [d["result"] for d in shown["devices"]] == ["skipped", "skipped"]
    assert shown["devices"][0]["reason"] == "rollout aborted"  # its queued command cancelled
    expect(first.get_by_test_id("rollout-device-reason")).to_have_text("rollout aborted")
    status, entries = admin(console_platform, "GET", f"/audit?subject={rollout['id']}")
    assert status == 200
    assert any(
        e["action"] == "rollout.abort" and e["actor"].startswith("console:")
        for e in entries["entries"]
    ), entries
    # the other one is still running, untouched
    assert admin(console_platform, "GET", f"/rollouts/{older['id']}")[1]["state"] == "running"
    assert admin(console_platform, "POST", f"/rollouts/{older['id']}/abort")[0] == 200


def test_the_start_form_shows_the_api_error_then_starts_one_that_its_page_follows(
    console: Page, console_platform: PlatformProcess, release: None
) -> None:
    devices = enrolled(console_platform, "roll-b1", "roll-b2")
    page = console
    page.goto("/#/rollouts")
    page.get_by_test_id("rollout-new-app").fill(APP)
    page.get_by_test_id("rollout-new-version").fill("9")
    page.get_by_test_id("rollout-new-devices").fill(", ".join(devices))
    page.get_by_test_id("rollout-start").click()
    expect(page.get_by_test_id("error-text")).to_have_text(
        "Starting the rollout failed: no release web 9 (add it with iotbiz release add)"
    )

    page.get_by_test_id("rollout-new-version").fill(VERSION)
    page.get_by_test_id("rollout-new-batch").fill("1")
    page.get_by_test_id("rollout-new-max-failures").fill("1")
    page.get_by_test_id("rollout-start").click()
    expect(page).to_have_url(re.compile(r"/#/rollouts/r-[0-9a-f]{16}$"))
    expect(page.get_by_test_id("rollout-figures")).to_have_attribute("data-state", "running")
    rollout_id = page.get_by_test_id("rollout-id").inner_text()
    status, rollout = admin(console_platform, "GET", f"/rollouts/{rollout_id}")
    assert status == 200, rollout
    assert (rollout["app"], rollout["version"], rollout["batch_size"], rollout["max_failures"]) == (
        APP,
        VERSION,
        1,
        1,
    )
    assert [d["name"] for d in rollout["devices"]] == devices
    assert rollout["actor"].startswith("console:"), json.dumps(rollout)

    # aborted elsewhere: the page, polling while the rollout runs, follows without a reload
    page.evaluate("window.notReloaded = true")
    assert admin(console_platform, "POST", f"/rollouts/{rollout_id}/abort")[0] == 200
    expect(page.get_by_test_id("rollout-figures")).to_have_attribute("data-state", "aborted")
    expect(page.get_by_test_id("rollout-abort")).to_have_count(0)
    assert page.evaluate("window.notReloaded") is True


def test_the_start_form_by_customer_id(
    console: Page, console_platform: PlatformProcess, release: None
) -> None:
    enrolled(console_platform, "roll-c1")
    status, fleet = admin(console_platform, "GET", f"/devices?customer={CUSTOMER}&limit=1000")
    assert status == 200, fleet
    active = sorted(d["name"] for d in fleet["devices"] if d["state"] == "active")
    page = console
    page.goto("/#/rollouts")
    page.get_by_test_id("rollout-new-app").fill(APP)
    page.get_by_test_id("rollout-new-version").fill(VERSION)
    page.get_by_test_id("rollout-new-devices").fill(f"{CUSTOMER}/roll-c1")
    page.get_by_test_id("rollout-new-customer").fill(CUSTOMER)
    page.get_by_test_id("rollout-start").click()
    expect(page.get_by_test_id("error-text")).to_have_text(
        "Starting the rollout failed: give exactly one of devices, customer_id"
    )

    page.get_by_test_id("rollout-new-devices").fill("")
    page.get_by_test_id("rollout-start").click()
    expect(page.get_by_test_id("rollout-figures")).to_have_attribute("data-state", "running")
    expect(page.get_by_test_id("rollout-total")).to_have_text(str(len(active)))
    rollout_id = page.get_by_test_id("rollout-id").inner_text()
    status, rollout = admin(console_platform, "GET", f"/rollouts/{rollout_id}")
    assert status == 200, rollout
    assert [d["name"] for d in rollout["devices"]] == active
    page.get_by_test_id("rollout-abort").click()
    page.get_by_test_id("confirm-ok").click()
    expect(page.get_by_test_id("rollout-figures")).to_have_attribute("data-state", "aborted")
    assert admin(console_platform, "GET", f"/rollouts/{rollout_id}")[1]["state"] == "aborted"


def test_the_page_follows_a_device_committing_while_the_rollout_runs(
    console: Page, console_platform: PlatformProcess, release: None
) -> None:
    """A paho client answers its update `committed`: the open page (polling) shows it committed,
    the progress 1/2 and the second batch, without a reload."""
    name = f"{CUSTOMER}/roll-d1"
    password = enroll_device(console_platform.url, CUSTOMER, "roll-d1")
    offline = enrolled(console_platform, "roll-d2")
    commands: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=10)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311)
    client.username_pw_set(name, password)
    client.on_message = lambda _c, _u, message: commands.put(json.loads(message.payload))
    client.connect("127.0.0.1", console_platform.mqtt_port, keepalive=30)
    client.loop_start()
    try:
        client.subscribe(f"devices/{name}/cmd", qos=1)
        client.publish(f"devices/{name}/status", json.dumps({"state": "online"}), retain=True)
        rollout = start(console_platform, [name, *offline])
        page = console
        page.goto(f"/#/rollouts/{rollout['id']}")
        row = page.locator(f'[data-testid="rollout-device"][data-name="{name}"]')
        expect(row).to_have_attribute("data-result", "updating")
        page.evaluate("window.notReloaded = true")
        command = commands.get(timeout=15)
        assert command["action"] == "update", command
        reply = {"id": command["id"], "ok": True, "result": {"outcome": "committed", "reason": ""}}
        client.publish(f"devices/{name}/reply", json.dumps(reply), qos=1).wait_for_publish(10)
        expect(row).to_have_attribute("data-result", "committed")
        progress = page.get_by_test_id("rollout-progress")
        expect(progress).to_have_attribute("data-committed", "1")
        expect(page.get_by_test_id("rollout-progress-text")).to_have_text("1/2 committed")
        expect(page.get_by_test_id("rollout-batch")).to_have_text("2/2")
        second = page.locator(f'[data-testid="rollout-device"][data-name="{offline[0]}"]')
        expect(second).to_have_attribute("data-result", "updating")
        assert page.evaluate("window.notReloaded") is True
    finally:
        client.disconnect()
        client.loop_stop()
    assert admin(console_platform, "POST", f"/rollouts/{rollout['id']}/abort")[0] == 200
