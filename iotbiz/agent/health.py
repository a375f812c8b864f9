"""Health checks of a running app: an HTTP GET that must answer 2xx, or a command that must exit 0.

`watch_health` checks every `interval_s` (after `grace_s`) and returns once `failures` checks in
a row have failed; the supervisor then restarts the app. `check_health` is one check: None when
healthy, else what was wrong. A check command runs like the app (its cwd, env and user, its own
session, killed with the agent) and is killed, with its group, when it outlives `timeout_s`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess

from iotbiz.agent.processes import KILL_WAIT_S, describe_exit, signal_group, spawn
from iotbiz.settings import AppSettings, HealthSettings

log = logging.getLogger(__name__)


async def watch_health(settings: AppSettings, health: HealthSettings) -> str:
    """Check the app's health until `health.failures` checks in a row fail: the reason."""
    await asyncio.sleep(health.grace_s)
    failed = 0
    while True:
        problem = await check_health(settings, health)
        if problem is None:
            failed = 0
        else:
            failed += 1
            log.warning(
                "%s: health check failed (%d of %d): %s",
                settings.name,
                failed,
                health.failures,
                problem,
            )
            if failed >= health.failures:
                return f"{failed} failed health checks, last: {problem}"
        await asyncio.sleep(health.interval_s)


async def check_health(settings: AppSettings, health: HealthSettings) -> str | None:
    """One health check: None when healthy, else what was wrong."""
    if health.http is not None:
        # asyncio.timeout, not wait_for: in Python 3.11 wait_for can swallow a cancellation that
        # arrives with the result, and the supervisor would then wait for ever for this check.
        try:
            async with asyncio.timeout(health.timeout_s + 1.0):
                return await asyncio.to_thread(_get_http, health.http, health.timeout_s)
        except TimeoutError:
            return f"no answer within {health.timeout_s:g} s"
    if health.command is None:
        return None
    try:
        proc = await spawn(
            health.command,
            cwd=settings.cwd,
            env=settings.env,
            user=settings.user,
            output=subprocess.DEVNULL,
        )
    except (OSError, LookupError, ValueError, subprocess.SubprocessError) as exc:
        return f"cannot run {health.command[0]}: {exc}"
    exited = asyncio.create_task(proc.wait())
    try:
        done, _ = await asyncio.wait({exited}, timeout=health.timeout_s)
    finally:
        if not exited.done():  # timed out, or this check is cancelled: no process left behind
            signal_group(proc.pid, signal.SIGKILL)
            await asyncio.wait({exited}, timeout=KILL_WAIT_S)
    if not done:
        return f"command timed out after {health.timeout_s:g} s"
    returncode = exited.result()
    return None if returncode == 0 else f"command {describe_exit(returncode)}"


def _get_http(url: str, timeout_s: float) -> str | None:
    """GET `url` (in a worker thread): None on a 2xx answer, else what was wrong."""
    # Imported here: urllib.request pulls in ssl, email and http.client (about 7 MB of RSS),
    # which only agents with an HTTP health check should pay for.
    import http.client
    import urllib.error
    import urllib.request

    if not url.startswith(("http://", "https://")):
        return f"not an http(s) URL: {url}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy from env
    try:
        with opener.open(url, timeout=timeout_s) as response:
            status: int = response.status
    except urllib.error.HTTPError as exc:
        exc.close()
        return f"HTTP {exc.code}"
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return f"GET failed: {exc}"
    return None if 200 <= status < 300 else f"HTTP {status}"
