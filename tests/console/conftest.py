"""Browser tests of the web console: Debian's chromium driven by Playwright (sync API) against the
real platform in a child process, with a real agent process or a paho client as the devices.

One platform and one browser serve the whole module (starting them is most of the cost); each
test gets its own browser context, logged in with a session cookie made once (`logged_in_state`):
the login rate limit (ten tries a minute per address) is kept for the login test itself. A
JavaScript error on a page fails the test that opened it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.processes import PlatformProcess, platform_process

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
]
TOKEN = "console-test-token-0123456789abcdef"
CUSTOMER = "acme"
# Samples every second, written at once (not held 10 minutes), live events every 0.2 s: so that
# a test sees a chart and a live change within seconds.
PLATFORM_TOML = f"""
[admin]
token = "{TOKEN}"
[history]
sample_interval_s = 1
write_interval_s = 0
[commands]
poll_s = 0.1
[console]
stream_interval_s = 0.2
"""
WAIT_MS = 15_000
expect.set_options(timeout=WAIT_MS)


def launch_chromium(playwright: Any) -> Browser:
    """Debian's chromium (scripts/browser-setup installs it); never a downloaded browser."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/browser-setup to install chromium")
    browser: Browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    return browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def console_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlatformProcess]:
    folder = tmp_path_factory.mktemp("console-platform")
    config = folder / "platform.toml"
    config.write_text(PLATFORM_TOML)
    with platform_process(
        folder, "--config", str(config), "--db", str(folder / "iotbiz.db")
    ) as platform:
        status, answer = admin(
            platform, "POST", "/customers", {"customer_id": CUSTOMER, "device_limit": 20}
        )
        assert status == 201, answer
        yield platform


def admin(
    platform: PlatformProcess, method: str, path: str, body: dict[str, Any] | None = None
) -> tuple[int, Any]:
    """One admin API call with the bearer token (the way scripts call it)."""
    request = urllib.request.Request(  # noqa: S310 - loopback
        f"{platform.url}/api/v1/admin{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=35) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture(scope="module")
def logged_in_state(browser: Browser, console_platform: PlatformProcess) -> Any:
    """The cookies of one console login, for every test's new context."""
    context = browser.new_context(base_url=console_platform.url)
    try:
        answer = context.request.post("/api/v1/console/login", data={"token": TOKEN})
        assert answer.status == 200, answer.text()
        return context.storage_state()
    finally:
        context.close()


@pytest.fixture
def new_page(browser: Browser, console_platform: PlatformProcess) -> Iterator[Callable[..., Page]]:
    """Pages in fresh contexts (`make(logged_in_state)`: with the module's session); uncaught JS
    errors and Content-Security-Policy violations on any of them fail the test."""
    contexts = []
    errors: list[str] = []

    def make(state: Any = None) -> Page:
        context = browser.new_context(
            base_url=console_platform.url,
            storage_state=state,
            viewport={"width": 1400, "height": 900},
        )
        context.set_default_timeout(WAIT_MS)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on(
            "console",
            lambda message: (
                errors.append(message.text) if "Content Security Policy" in message.text else None
            ),
        )
        return page

    yield make
    for context in contexts:
        context.close()
    assert errors == [], errors


@pytest.fixture
def console(new_page: Callable[..., Page], logged_in_state: Any) -> Page:
    """A logged-in console page (nothing opened yet)."""
    return new_page(logged_in_state)


# ---- a real agent supervising one app -----------------------------------------------------

AGENT_DEVICE = "gateway-1"
LOG_MARKER = "console-test: listening on :8000"
APP = f"""
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
with open(sys.argv[1], "a") as starts:
    starts.write(f"{{os.getpid()}}\\n")
print("{LOG_MARKER}", os.getpid(), flush=True)
while True:
    time.sleep(0.2)
"""


class Agent:
    def __init__(self, folder: Path, process: Any) -> None:
        self.folder = folder
        self.process = process

    @property
    def name(self) -> str:
        return f"{CUSTOMER}/{AGENT_DEVICE}"

    def starts(self) -> list[int]:
        path = self.folder / "starts.txt"
        return [int(line) for line in path.read_text().split()] if path.exists() else []

    def log(self) -> str:
        return (self.folder / "agent.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def agent(
    tmp_path_factory: pytest.TempPathFactory, console_platform: PlatformProcess
) -> Iterator[Agent]:
    """`python -m iotbiz.agent` enrolled and online, its app `web` running."""
    folder = tmp_path_factory.mktemp("console-agent")
    program = folder / "app.py"
    program.write_text(APP)
    command = [sys.executable, str(program), str(folder / "starts.txt")]
    config = folder / "agent.toml"
    config.write_text(
        f'customer_id = "{CUSTOMER}"\ndevice_id = "{AGENT_DEVICE}"\n'
        f'registrar_url = "{console_platform.url}"\n'
        f'broker_url = "mqtt://127.0.0.1:{console_platform.mqtt_port}"\n'
        f'state_dir = "{folder / "state"}"\n'
        "telemetry_interval_s = 1\nkeepalive_s = 5\n"
        f'\n[[apps]]\nname = "web"\ncommand = {json.dumps(command)}\nstop_timeout_s = 3.0\n'
    )
    with (folder / "agent.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "iotbiz.agent", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=folder,
        )
    running = Agent(folder, process)
    try:

        def web_running() -> bool:
            status, device = admin(console_platform, "GET", f"/devices/{running.name}")
            apps = (device.get("telemetry") or {}).get("apps", []) if status == 200 else []
            return bool(device.get("online")) and any(
                app.get("name") == "web" and app.get("state") == "RUNNING" for app in apps
            )

        until(web_running, 30, f"the agent online with web RUNNING:\n{running.log()}")
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
