"""Screenshots of the web console for the docs, taken from a real platform with real devices.

Starts the platform as a child process (`python -m iotbiz.broker`, a new store in a temporary
folder, ports 0), adds three customers through the admin API, starts one real agent
(`python -m iotbiz.agent`, acme/gateway-01, supervising three small apps: one serves "requests"
and logs them, one idles, one crashes at start and ends FATAL) and a dozen simulated devices
(paho MQTT clients enrolled over HTTP that send telemetry and events; some disconnect again),
tags a few, sends a few commands, and gives gateway-01 an hour of telemetry history (written into
the store beside the platform: an hour of real samples would take an hour). Then Debian's chromium
(headless) logs in and photographs the pages:

    docs/console-login.png docs/console-fleet.png docs/console-device.png
    docs/console-customers.png docs/console-audit.png

    python scripts/console_screenshots.py [--out docs]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from playwright.sync_api import Page, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from iotbiz.models import TelemetrySample  # noqa: E402
from iotbiz.names import DeviceName  # noqa: E402
from iotbiz.store import Store  # noqa: E402
from tests.console.conftest import CHROMIUM, CHROMIUM_ARGS  # noqa: E402 - the tests' launch
from tests.processes import PlatformProcess, enroll_device, platform_process  # noqa: E402

TOKEN = "screenshot-admin-token-0123456789"  # noqa: S105 - a throw-away platform's
CUSTOMERS = {"acme": 25, "globex": 12, "initech": 6}
# (customer, device, online, cpu, memory, apps {name: state}, tags)
DEVICES: list[tuple[str, str, bool, float, float, dict[str, str], dict[str, str]]] = [
    (
        "acme",
        "gateway-02",
        True,
        23.0,
        41.0,
        {"web": "RUNNING", "worker": "RUNNING"},
        {"site": "berlin"},
    ),
    (
        "acme",
        "gateway-03",
        True,
        67.5,
        72.0,
        {"web": "RUNNING", "worker": "BACKOFF"},
        {"site": "berlin"},
    ),
    ("acme", "pump-07", True, 8.0, 33.0, {"pump-ctl": "RUNNING"}, {"site": "hamburg"}),
    ("acme", "pump-08", False, 5.0, 31.0, {"pump-ctl": "RUNNING"}, {"site": "hamburg"}),
    (
        "acme",
        "camera-11",
        True,
        91.0,
        88.0,
        {"stream": "RUNNING", "detect": "FATAL"},
        {"site": "munich"},
    ),
    (
        "globex",
        "kiosk-a1",
        True,
        14.0,
        52.0,
        {"ui": "RUNNING", "sync": "RUNNING"},
        {"store": "s-104"},
    ),
    (
        "globex",
        "kiosk-a2",
        True,
        18.0,
        49.0,
        {"ui": "RUNNING", "sync": "STARTING"},
        {"store": "s-104"},
    ),
    (
        "globex",
        "kiosk-b1",
        False,
        11.0,
        47.0,
        {"ui": "STOPPED", "sync": "RUNNING"},
        {"store": "s-221"},
    ),
    ("globex", "meter-9", True, 3.0, 22.0, {"meter": "RUNNING"}, {}),
    ("initech", "printer-1", True, 35.0, 61.0, {"spool": "RUNNING"}, {"floor": "2"}),
    ("initech", "printer-2", False, 2.0, 18.0, {"spool": "EXITED"}, {"floor": "3"}),
]

WEB_APP = """
import os, random, signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
print(f"web: listening on 0.0.0.0:8000 (pid {os.getpid()})", flush=True)
paths = ["/status", "/api/readings", "/api/config", "/healthz"]
while True:
    path = random.choice(paths)
    size, ms = random.randint(80, 4000), random.randint(1, 40)
    print(f'127.0.0.1 "GET {path} HTTP/1.1" 200 {size} {ms}ms', flush=True)
    time.sleep(random.uniform(0.3, 1.2))
"""
CRASHING_APP = """
import sys
print("uplink: cannot open /dev/ttyUSB0: No such file or directory", file=sys.stderr, flush=True)
sys.exit(1)
"""


def admin(url: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(  # noqa: S310 - loopback
        f"{url}/api/v1/admin{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=35) as response:  # noqa: S310
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"{method} {path}: {exc.code} {exc.read()!r}") from None


def wait_for(check: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def start_agent(folder: Path, platform: PlatformProcess) -> subprocess.Popen[bytes]:
    (folder / "web.py").write_text(WEB_APP)
    (folder / "uplink.py").write_text(CRASHING_APP)
    apps = [
        ("web", [sys.executable, str(folder / "web.py")], ""),
        ("worker", [sys.executable, "-c", "import time; time.sleep(86400)"], ""),
        ("uplink", [sys.executable, str(folder / "uplink.py")], "start_retries = 2\n"),
    ]
    config = folder / "agent.toml"
    config.write_text(
        'customer_id = "acme"\ndevice_id = "gateway-01"\n'
        f'registrar_url = "{platform.url}"\n'
        f'broker_url = "mqtt://127.0.0.1:{platform.mqtt_port}"\n'
        f'state_dir = "{folder / "agent-state"}"\n'
        "telemetry_interval_s = 2\nkeepalive_s = 10\n"
        + "".join(
            f'\n[[apps]]\nname = "{name}"\ncommand = {json.dumps(command)}\n{extra}'
            for name, command, extra in apps
        )
    )
    log = (folder / "agent.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "iotbiz.agent", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=folder,
    )


def telemetry(cpu: float, memory: float, apps: dict[str, str], rng: random.Random) -> bytes:
    return json.dumps(
        {
            "ts": time.time(),
            "agent_version": "0.1.0",
            "system": {
                "cpu_percent": cpu,
                "load": [cpu / 50, cpu / 60, cpu / 70],
                "memory": {
                    "total": 2 << 30,
                    "available": int((1 - memory / 100) * (2 << 30)),
                    "percent": memory,
                },
                "disk": {
                    "path": "/var/lib/iotbiz-agent",
                    "total": 32 << 30,
                    "free": 20 << 30,
                    "percent": 37.5,
                },
                "uptime_s": rng.randint(3600, 40 * 86400),
                "temperature_c": round(rng.uniform(38, 61), 1),
            },
            "apps": [
                {
                    "name": name,
                    "state": state,
                    "pid": rng.randint(300, 30000) if state in ("RUNNING", "STARTING") else None,
                    "restarts": rng.choice([0, 0, 1, 3]) if state != "FATAL" else 3,
                    "version": "2.4.1",
                    "reason": None,
                }
                for name, state in apps.items()
            ],
        }
    ).encode()


def start_simulated(platform: PlatformProcess, rng: random.Random) -> list[mqtt.Client]:
    clients = []
    for customer, device, online, cpu, memory, apps, tags in DEVICES:
        name = f"{customer}/{device}"
        password = enroll_device(platform.url, customer, device)
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311)
        client.username_pw_set(name, password)
        client.connect("127.0.0.1", platform.mqtt_port, keepalive=60)
        client.loop_start()
        client.publish(
            f"devices/{name}/telemetry", telemetry(cpu, memory, apps, rng), qos=1
        ).wait_for_publish(10)
        for app, state in apps.items():
            if state in ("BACKOFF", "FATAL", "STOPPED", "EXITED"):
                event = {
                    "event": "app.state",
                    "app": app,
                    "from": "RUNNING",
                    "to": state,
                    "reason": "exit 1" if state != "STOPPED" else "stopped by operator",
                    "ts": time.time(),
                }
                client.publish(f"devices/{name}/events", json.dumps(event), qos=1).wait_for_publish(
                    10
                )
        if tags:
            admin(platform.url, "PATCH", f"/devices/{name}/tags", {"tags": tags})
        if not online:
            client.disconnect()
            client.loop_stop()
        else:
            clients.append(client)
    return clients


async def write_history(db: Path, name: DeviceName, memory_now: float, rng: random.Random) -> None:
    """The hour before now, a sample every 30 s: a wavy CPU load with noise and one busy spell;
    memory around what the device reports now (so that the real samples that follow join it)."""
    store = await Store.open(db)
    try:
        now = time.time()
        samples = []
        for i in range(120, 0, -1):
            at = now - 30 * i
            wave = 22 + 14 * math.sin(i / 9) + 6 * math.sin(i / 2.3)
            cpu = max(1.0, min(99.0, wave + rng.uniform(-4, 4) + (25 if 40 < i < 47 else 0)))
            memory = max(0.5, memory_now + 1.5 * math.sin(i / 30) + rng.uniform(-0.3, 0.3))
            samples.append((name, TelemetrySample(round(at, 3), round(cpu, 1), round(memory, 1))))
        await store.record_samples(samples)
    finally:
        await store.close()


def shoot(page: Page, path: Path, height: int | None = None) -> None:
    if height:
        page.set_viewport_size({"width": 1440, "height": height})
    page.evaluate("window.scrollTo(0, 0)")
    page.wait_for_timeout(400)  # the toasts' and spinners' transitions
    page.screenshot(path=str(path))
    print(f"wrote {path}")


def take_screenshots(platform: PlatformProcess, out: Path) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(
            base_url=platform.url, viewport={"width": 1440, "height": 900}, device_scale_factor=1
        )
        context.set_default_timeout(20_000)
        page = context.new_page()
        page.goto("/")
        page.get_by_test_id("login-form").wait_for()
        shoot(page, out / "console-login.png")

        page.get_by_test_id("login-token").fill(TOKEN)
        page.get_by_test_id("login-submit").click()
        page.locator('[data-testid="device-row"][data-name="acme/gateway-01"]').wait_for()
        page.wait_for_timeout(1500)
        shoot(page, out / "console-fleet.png", 980)

        page.goto("/#/devices/acme/gateway-01")
        page.locator('[data-testid="app-row"][data-app="web"]').wait_for()
        page.get_by_test_id("chart-cpu").wait_for()
        page.get_by_test_id("logs-app").select_option("web")
        page.get_by_test_id("logs-fetch").click()
        page.get_by_test_id("logs-output").filter(has_text="GET").wait_for()
        page.wait_for_timeout(4500)  # let the toast go
        shoot(page, out / "console-device.png", 1640)

        page.goto("/#/customers")
        page.get_by_test_id("customer-row").first.wait_for()
        shoot(page, out / "console-customers.png", 700)

        page.goto("/#/audit")
        page.get_by_test_id("audit-row").first.wait_for()
        shoot(page, out / "console-audit.png", 900)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} is missing: run scripts/browser-setup")
    rng = random.Random(3)
    os.environ.update(
        {
            "IOTBIZ_ADMIN_TOKEN": TOKEN,
            "IOTBIZ_HISTORY_SAMPLE_INTERVAL_S": "30",
            "IOTBIZ_HISTORY_WRITE_INTERVAL_S": "0",
            "IOTBIZ_COMMANDS_POLL_S": "0.2",
        }
    )
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        db = folder / "iotbiz.db"
        with platform_process(folder, "--db", str(db)) as platform:
            for customer, limit in CUSTOMERS.items():
                admin(
                    platform.url,
                    "POST",
                    "/customers",
                    {"customer_id": customer, "device_limit": limit},
                )
            agent = start_agent(folder, platform)
            clients: list[mqtt.Client] = []
            try:
                gateway = "/devices/acme/gateway-01"

                def gateway_ready() -> bool:
                    try:
                        device = admin(platform.url, "GET", gateway)
                    except SystemExit:
                        return False
                    apps = {
                        a["name"]: a["state"] for a in (device["telemetry"] or {}).get("apps", [])
                    }
                    return (
                        device["online"]
                        and apps.get("web") == "RUNNING"
                        and apps.get("uplink") == "FATAL"
                    )

                wait_for(gateway_ready, 60, "gateway-01 online with web RUNNING and uplink FATAL")
                system = admin(platform.url, "GET", gateway)["telemetry"]["system"]
                memory_now = float(system["memory"]["percent"])
                gateway_name = DeviceName("acme", "gateway-01")
                asyncio.run(write_history(db, gateway_name, memory_now, rng))
                admin(
                    platform.url,
                    "PATCH",
                    f"{gateway}/tags",
                    {"tags": {"site": "berlin", "rack": "r2", "role": "edge"}},
                )
                clients = start_simulated(platform, rng)
                for action, command_args in (("ping", {}), ("app.restart", {"name": "worker"})):
                    answer = admin(
                        platform.url,
                        "POST",
                        "/commands",
                        {"device": "acme/gateway-01", "action": action, "args": command_args},
                    )
                    admin(platform.url, "GET", f"/commands/{answer['commands'][0]['id']}?wait=30")
                admin(platform.url, "PATCH", "/customers/initech", {"device_limit": 2})
                take_screenshots(platform, args.out)
            finally:
                for client in clients:
                    client.disconnect()
                    client.loop_stop()
                agent.send_signal(signal.SIGTERM)
                try:
                    agent.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    agent.kill()


if __name__ == "__main__":
    main()
