"""The web console in a real browser against the real platform: log in and out, a device coming
online live, an app restarted from its page (the new pid shown), its log tail, the telemetry chart,
the CSRF lock, and markup from a device shown as text."""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from playwright.sync_api import Page, expect

from tests.console.conftest import (
    CUSTOMER,
    LOG_MARKER,
    TOKEN,
    Agent,
    admin,
    until,
)
from tests.processes import PlatformProcess, enroll_device, post_json

pytestmark = pytest.mark.timeout(60)


def test_login_wrong_token_then_right_token_then_logout(
    new_page: Callable[..., Page], console_platform: PlatformProcess
) -> None:
    page = new_page()
    page.goto("/")
    page.get_by_test_id("login-token").fill("not-the-token")
    page.get_by_test_id("login-submit").click()
    expect(page.get_by_test_id("login-error")).to_have_text("missing or wrong admin token")
    expect(page.get_by_test_id("fleet-table")).to_have_count(0)

    page.get_by_test_id("login-token").fill(TOKEN)
    page.get_by_test_id("login-submit").click()
    expect(page.get_by_test_id("fleet-table")).to_be_visible()
    expect(page.get_by_test_id("fleet-table")).to_have_attribute("data-loaded", "true")
    page.reload()  # the session is the cookie: a reload stays logged in
    expect(page.get_by_test_id("fleet-table")).to_be_visible()

    page.get_by_test_id("logout").click()
    expect(page.get_by_test_id("login-page")).to_be_visible()
    expect(page.get_by_test_id("fleet-table")).to_have_count(0)
    page.reload()  # the session ended on the server, not only in the page
    expect(page.get_by_test_id("login-page")).to_be_visible()
    answer = page.request.get("/api/v1/admin/customers")
    assert answer.status == 401


def test_a_device_comes_online_live_and_its_markup_stays_text(
    console: Page, console_platform: PlatformProcess
) -> None:
    """The device is enrolled (offline) and the fleet open; then a paho client connects as the
    device and sends telemetry whose app name is markup: its row turns online through the event
    stream (no reload) and the app name shows as text, not as an element."""
    device_id = "live-1"
    name = f"{CUSTOMER}/{device_id}"
    password = enroll_device(console_platform.url, CUSTOMER, device_id)
    page = console
    page.goto("/#/fleet")
    row = page.locator(f'[data-testid="device-row"][data-name="{name}"]')
    expect(row).to_have_attribute("data-online", "false")
    page.evaluate("window.notReloaded = true")

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311)
    client.username_pw_set(name, password)
    client.connect("127.0.0.1", console_platform.mqtt_port, keepalive=30)
    client.loop_start()
    try:
        telemetry = {
            "ts": 1.0,
            "system": {"cpu_percent": 12.5, "memory": {"percent": 40.0}},
            "apps": [{"name": "<img src=x id=injected>", "state": "FATAL", "pid": None}],
        }
        info = client.publish(f"devices/{name}/telemetry", json.dumps(telemetry).encode(), qos=1)
        info.wait_for_publish(10)
        expect(row).to_have_attribute("data-online", "true")
        expect(row.get_by_test_id("online-dot")).to_have_attribute("data-online", "true")
        apps = row.get_by_test_id("device-apps")
        expect(apps).to_contain_text("<img src=x id=injected>FATAL")
        assert page.locator("#injected").count() == 0
        assert page.evaluate("window.notReloaded") is True
        expect(page.get_by_test_id("fleet-online")).not_to_have_text("0")
    finally:
        client.disconnect()
        client.loop_stop()


def open_device(page: Page, agent: Agent) -> None:
    page.goto(f"/#/devices/{agent.name}")
    expect(page.get_by_test_id("device-name")).to_have_text(agent.name.split("/")[1])
    expect(page.get_by_test_id("device-online")).to_have_attribute("data-online", "true")


def test_restart_an_app_from_its_page_shows_the_new_pid(console: Page, agent: Agent) -> None:
    page = console
    open_device(page, agent)
    web = page.locator('[data-testid="app-row"][data-app="web"]')
    expect(web.get_by_test_id("app-state")).to_contain_text("RUNNING")
    old_pid = until(lambda: agent.starts(), 10, "the app's first start")[-1]
    expect(web.get_by_test_id("app-pid")).to_have_text(str(old_pid))

    web.get_by_test_id("app-restart").click()
    # (the "restarting…" note shows only until the command's answer: tens of milliseconds, so
    # a check for it raced the answer and failed on a busy machine; the toast stays)
    expect(page.get_by_test_id("toast").last).to_contain_text("web: restart done")
    new_pid = until(lambda: agent.starts()[-1] != old_pid and agent.starts()[-1], 20, "a restart")
    expect(web.get_by_test_id("app-pid")).to_have_text(str(new_pid))
    expect(web.get_by_test_id("app-state")).to_have_text("RUNNING")
    first = page.get_by_test_id("command-row").first
    expect(first).to_contain_text("app.restart")
    expect(first).to_have_attribute("data-state", "done")
    assert len(agent.starts()) == 2  # started once, restarted once

    page.get_by_test_id("device-ping").click()
    expect(page.get_by_test_id("toast").last).to_contain_text("answered in")
    expect(page.get_by_test_id("command-row").first).to_contain_text("pong")


def test_the_log_tail_shows_a_line_the_app_printed(console: Page, agent: Agent) -> None:
    page = console
    open_device(page, agent)
    expect(page.get_by_test_id("logs-app")).to_have_value("web")
    page.get_by_test_id("logs-fetch").click()
    output = page.get_by_test_id("logs-output")
    expect(output).to_contain_text(LOG_MARKER)
    expect(output).to_have_attribute("data-app", "web")
    expect(page.get_by_test_id("logs-info")).to_contain_text("lines of web")


def test_the_cpu_and_memory_charts_draw_the_samples(
    console: Page, agent: Agent, console_platform: PlatformProcess
) -> None:
    def samples() -> list[Any]:
        status, answer = admin(console_platform, "GET", f"/devices/{agent.name}/telemetry")
        return answer["samples"] if status == 200 and len(answer["samples"]) >= 3 else []

    until(samples, 20, "three telemetry samples")
    page = console
    open_device(page, agent)
    for chart in ("chart-cpu", "chart-memory"):
        svg = page.get_by_test_id(chart)
        expect(svg).to_be_visible()
        count = int(svg.get_attribute("data-points") or 0)
        assert count >= 3
        path = svg.get_by_test_id("chart-line").get_attribute("d") or ""
        points = re.findall(r"[ML]([\d.]+),([\d.]+)", path)
        assert len(points) == count, path
    page.get_by_test_id("range-day").click()
    expect(page.get_by_test_id("range-day")).to_have_class(re.compile(r"\bactive\b"))
    expect(page.get_by_test_id("chart-cpu").get_by_test_id("chart-line")).to_have_count(1)


def test_a_change_without_the_csrf_header_is_refused(
    console: Page, console_platform: PlatformProcess
) -> None:
    """Page JS with the session cookie but no X-CSRF-Token: 403; with the header: made."""
    page = console
    page.goto("/#/customers")
    expect(page.get_by_test_id("customers-table")).to_be_visible()
    result = page.evaluate(
        """async () => {
            const post = (headers) => fetch("/api/v1/admin/customers", {
                method: "POST", headers: {"Content-Type": "application/json", ...headers},
                body: JSON.stringify({customer_id: "csrf-test", device_limit: 1}),
            }).then(async (r) => [r.status, await r.json()]);
            const without = await post({});
            const session = await fetch("/api/v1/console/session").then((r) => r.json());
            const withToken = await post({"X-CSRF-Token": session.csrf_token});
            return {without, withToken};
        }"""
    )
    assert result["without"] == [403, {"error": "missing or wrong CSRF token"}]
    assert result["withToken"][0] == 201
    status, _ = admin(console_platform, "GET", "/customers/csrf-test")
    assert status == 200


def test_a_failed_call_shows_its_error_in_the_banner(console: Page) -> None:
    page = console
    page.goto("/#/customers")
    expect(
        page.locator(f'[data-testid="customer-row"][data-customer="{CUSTOMER}"]')
    ).to_be_visible()
    page.get_by_test_id("customer-new-id").fill(CUSTOMER)
    page.get_by_test_id("customer-add").click()
    banner = page.get_by_test_id("error-banner")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text(f"Adding {CUSTOMER} failed")
    expect(banner).to_contain_text("exists")


def test_the_fleet_pages_forward_and_back_by_cursor(
    console: Page, console_platform: PlatformProcess
) -> None:
    """105 registrations of one customer: 100 on the first page, 5 on the next, and back."""
    customer = "bulk"
    status, answer = admin(
        console_platform, "POST", "/customers", {"customer_id": customer, "device_limit": 200}
    )
    assert status == 201, answer
    for i in range(105):
        status, answer = post_json(
            console_platform.url + "/api/v1/register",
            {"customer_id": customer, "mac_address": f"dev-{i:03d}"},
        )
        assert status == 201, answer
    page = console
    page.goto("/#/fleet")
    expect(page.get_by_test_id("fleet-table")).to_have_attribute("data-loaded", "true")
    page.get_by_test_id("fleet-filter-customer").focus()
    page.get_by_test_id("fleet-filter-customer").select_option(customer)
    rows = page.get_by_test_id("device-row")
    info = page.get_by_test_id("fleet-page-info")
    expect(info).to_have_text("1\u2013100 of 105")
    expect(rows).to_have_count(100)
    expect(rows.first).to_have_attribute("data-name", f"{customer}/dev-000")
    expect(page.get_by_test_id("fleet-prev")).to_be_disabled()

    page.get_by_test_id("fleet-next").click()
    expect(info).to_have_text("101\u2013105 of 105")
    expect(rows).to_have_count(5)
    expect(rows.first).to_have_attribute("data-name", f"{customer}/dev-100")
    expect(page.get_by_test_id("fleet-next")).to_be_disabled()

    page.get_by_test_id("fleet-prev").click()
    expect(info).to_have_text("1\u2013100 of 105")
    expect(rows.first).to_have_attribute("data-name", f"{customer}/dev-000")

    page.get_by_test_id("fleet-search").fill("dev-10")  # dev-100 ... dev-104
    expect(rows).to_have_count(5)
    expect(page.get_by_test_id("fleet-matching")).to_have_text("5")
    expect(info).to_have_text("1\u20135 of 5")


def test_tags_offline_live_and_revoke_with_a_confirm(
    console: Page, console_platform: PlatformProcess
) -> None:
    """A MAC device, its page opened with the MAC in another notation than the platform's."""
    password = enroll_device(console_platform.url, CUSTOMER, "44-8A-5B-00-00-07")
    name = f"{CUSTOMER}/44:8a:5b:00:00:07"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311)
    client.username_pw_set(name, password)
    client.connect("127.0.0.1", console_platform.mqtt_port, keepalive=30)
    client.loop_start()
    page = console
    try:
        page.goto(f"/#/devices/{CUSTOMER}/448a5b000007")
        expect(page.get_by_test_id("device-name")).to_have_text("44:8a:5b:00:00:07")
        expect(page.get_by_test_id("device-online")).to_have_attribute("data-online", "true")

        page.get_by_test_id("tag-input").fill("site=berlin")
        page.get_by_test_id("tag-add").click()
        expect(page.locator('[data-testid="tag"][data-key="site"]')).to_contain_text("berlin")
        assert admin(console_platform, "GET", f"/devices/{name}")[1]["tags"] == {"site": "berlin"}
        page.locator('[data-testid="tag"][data-key="site"]').get_by_test_id("tag-remove").click()
        expect(page.get_by_test_id("tag")).to_have_count(0)
        assert admin(console_platform, "GET", f"/devices/{name}")[1]["tags"] == {}
    finally:
        client.disconnect()
        client.loop_stop()
    # the device page follows the device: offline without a reload
    expect(page.get_by_test_id("device-online")).to_have_attribute("data-online", "false")

    page.get_by_test_id("device-revoke").click()
    page.get_by_test_id("confirm-cancel").click()
    expect(page.get_by_test_id("confirm-dialog")).to_have_count(0)
    assert admin(console_platform, "GET", f"/devices/{name}")[1]["state"] == "active"
    page.get_by_test_id("device-revoke").click()
    page.get_by_test_id("confirm-ok").click()
    expect(page.get_by_test_id("device-header")).to_contain_text("revoked")
    expect(page.get_by_test_id("device-revoke")).to_be_disabled()
    assert admin(console_platform, "GET", f"/devices/{name}")[1]["state"] == "revoked"


def test_the_fleet_refetches_at_most_once_a_second_while_devices_report(
    console: Page, console_platform: PlatformProcess
) -> None:
    """Three devices on the page send telemetry 20 times a second for 4 s; the stream sends an
    event every 0.2 s naming them; the page asks for its rows at most once a second."""
    clients = []
    for i in range(3):
        name = f"{CUSTOMER}/busy-{i}"
        password = enroll_device(console_platform.url, CUSTOMER, f"busy-{i}")
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311)
        client.username_pw_set(name, password)
        client.connect("127.0.0.1", console_platform.mqtt_port, keepalive=30)
        client.loop_start()
        clients.append((name, client))
    page = console
    page.goto("/#/fleet")
    with page.expect_response(lambda response: "q=busy-" in response.url):
        page.get_by_test_id("fleet-search").fill("busy-")
    rows = page.get_by_test_id("device-row")
    expect(rows).to_have_count(3)
    for row in rows.all():
        expect(row).to_have_attribute("data-online", "true")
    fetched: list[float] = []
    page.on(
        "request",
        lambda request: (
            fetched.append(time.monotonic()) if "/api/v1/admin/devices?" in request.url else None
        ),
    )
    try:
        end = time.monotonic() + 4
        n = 0
        while time.monotonic() < end:
            n += 1
            for name, client in clients:
                body = {"ts": time.time(), "system": {"cpu_percent": n % 100}, "apps": []}
                client.publish(f"devices/{name}/telemetry", json.dumps(body), qos=0)
            page.wait_for_timeout(50)  # (Playwright delivers the page's events while it waits)
        expect(rows.first.locator("td.cell-num").first).to_contain_text(f"{n % 100}%")
        page.wait_for_timeout(1500)  # any refetch still to come
    finally:
        for _, client in clients:
            client.disconnect()
            client.loop_stop()
    gaps = [later - earlier for earlier, later in itertools.pairwise(fetched)]
    assert 3 <= len(fetched) <= 7, fetched  # 5.5 s: not the 20 or more events' worth
    # the page keeps a second between refetches; these times are when Playwright delivered the
    # request events to this process (batched while it waits), so they jitter by ~0.1 s
    assert min(gaps) >= 0.75, gaps


def test_a_session_ended_elsewhere_brings_back_the_login(new_page: Callable[..., Page]) -> None:
    page = new_page()
    page.goto("/")
    page.get_by_test_id("login-token").fill(TOKEN)
    page.get_by_test_id("login-submit").click()
    expect(page.get_by_test_id("fleet-table")).to_be_visible()
    # the same cookie logged out by another client (e.g. another tab)
    csrf = page.request.get("/api/v1/console/session").json()["csrf_token"]
    answer = page.request.post("/api/v1/console/logout", headers={"X-CSRF-Token": csrf})
    assert answer.status == 200, answer.text()

    page.evaluate("location.hash = '#/customers'")  # its next call is refused (401), if no
    # live update's call was refused already
    expect(page.get_by_test_id("login-page")).to_be_visible()
    expect(page.get_by_test_id("login-note")).to_have_text("Your session has ended. Sign in again.")


def test_customers_add_and_change_a_limit(console: Page, console_platform: PlatformProcess) -> None:
    page = console
    page.goto("/#/customers")
    page.get_by_test_id("customer-new-id").fill("newco")
    page.get_by_test_id("customer-new-limit").fill("5")
    page.get_by_test_id("customer-add").click()
    row = page.locator('[data-testid="customer-row"][data-customer="newco"]')
    expect(row.get_by_test_id("customer-limit")).to_have_text("5")
    expect(row.get_by_test_id("customer-usage")).to_contain_text("0 of 5")

    row.get_by_test_id("customer-edit-limit").click()
    row.get_by_test_id("customer-limit-input").fill("7")
    row.get_by_test_id("customer-limit-save").click()
    expect(row.get_by_test_id("customer-limit")).to_have_text("7")
    assert admin(console_platform, "GET", "/customers/newco")[1]["device_limit"] == 7


def test_the_audit_log_filters_by_subject_and_pages_to_older_entries(
    console: Page, console_platform: PlatformProcess
) -> None:
    """55 tag changes of one device: 50 on the first page, 5 older ones on the next."""
    password = enroll_device(console_platform.url, CUSTOMER, "audited-1")
    assert password
    name = f"{CUSTOMER}/audited-1"
    for i in range(55):
        status, answer = admin(
            console_platform, "PATCH", f"/devices/{name}/tags", {"tags": {"n": str(i)}}
        )
        assert status == 200, answer
    page = console
    page.goto("/#/audit")
    expect(page.get_by_test_id("audit-row").first).to_be_visible()
    with page.expect_response(lambda response: "subject=" in response.url):
        page.get_by_test_id("audit-subject").fill(name)
    rows = page.get_by_test_id("audit-row")
    expect(rows.first).to_contain_text('changes={"n":"54"}')
    expect(rows).to_have_count(50)
    expect(page.get_by_test_id("audit-info")).to_have_text("Entries 1\u201350")
    page.get_by_test_id("audit-older").click()
    expect(page.get_by_test_id("audit-info")).to_have_text("Entries 51\u201357")
    # the five oldest changes, then the activation and the registration
    expect(rows).to_have_count(7)
    expect(rows.first).to_contain_text('changes={"n":"4"}')
    expect(rows.last).to_contain_text("device.register")
    expect(page.get_by_test_id("audit-older")).to_be_disabled()
