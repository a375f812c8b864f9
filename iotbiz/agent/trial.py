"""The trial of a new release: the app must reach RUNNING and stay there, and healthy when it
has a health check, for the trial period; every health check in the trial must pass (the first
after its `grace_s`, then every `interval_s`, and one more at the end). `TrialFailed` says why not.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from iotbiz.agent.health import check_health
from iotbiz.agent.supervisor import AppState, Supervisor
from iotbiz.settings import AppSettings

START_ALLOWANCE_S = 30.0  # beyond start_s, for the new release to reach RUNNING


class TrialFailed(Exception):
    """The new release did not stay up and healthy; the message is the reason."""


async def run_trial(supervisor: Supervisor, settings: AppSettings, trial_s: float) -> None:
    """Restart the app (its `current` already switched); TrialFailed unless it reaches RUNNING
    and stays there (and healthy) for `trial_s`."""
    name = settings.name
    changes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def on_event(event: dict[str, Any]) -> None:
        if event.get("app") == name and event.get("event") in ("app.state", "app.unhealthy"):
            changes.put_nowait(event)

    stop_listening = supervisor.listen(on_event)
    try:
        await supervisor.restart(name)
        await _until_running(supervisor, settings, changes)
        await _stay_up(supervisor, settings, changes, trial_s)
    finally:
        stop_listening()


async def _until_running(
    supervisor: Supervisor, settings: AppSettings, changes: asyncio.Queue[dict[str, Any]]
) -> None:
    if supervisor.status(settings.name).state is AppState.RUNNING:
        return
    try:
        async with asyncio.timeout(settings.start_s + START_ALLOWANCE_S):
            while True:
                event = await changes.get()
                if event.get("to") == AppState.RUNNING:
                    return
                if event.get("to") in (AppState.BACKOFF, AppState.EXITED, AppState.FATAL):
                    raise TrialFailed(f"crashed on start: {event.get('reason')}")
    except TimeoutError as exc:
        raise TrialFailed("did not reach RUNNING") from exc


async def _stay_up(
    supervisor: Supervisor,
    settings: AppSettings,
    changes: asyncio.Queue[dict[str, Any]],
    trial_s: float,
) -> None:
    deadline = time.monotonic() + trial_s
    health = settings.health
    next_check = time.monotonic() + (health.grace_s if health else trial_s)
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        try:
            async with asyncio.timeout(min(deadline, next_check) - now):
                event = await changes.get()
        except TimeoutError:
            event = None
        if event is not None:
            if event.get("event") == "app.unhealthy":
                raise TrialFailed(f"unhealthy in the trial: {event.get('reason')}")
            if event.get("to") != AppState.RUNNING:
                raise TrialFailed(f"left RUNNING in the trial: {event.get('reason')}")
        due = time.monotonic() >= next_check
        if health is not None and due and next_check < deadline:
            await _check(settings)
            next_check = time.monotonic() + health.interval_s
    if health is not None:
        await _check(settings)  # the last word: healthy at the end of the trial
    if supervisor.status(settings.name).state is not AppState.RUNNING:
        raise TrialFailed("not RUNNING at the end of the trial")


async def _check(settings: AppSettings) -> None:
    assert settings.health is not None  # noqa: S101 - only called with a health check
    problem = await check_health(settings, settings.health)
    if problem is not None:
        raise TrialFailed(f"health check failed in the trial: {problem}")
