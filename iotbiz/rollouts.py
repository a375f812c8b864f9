"""The rollout engine: starts each running rollout's batches, one after another, and records
its devices' results (the rollout life cycle is in `iotbiz.store.rollouts`).

One long-lived task (`run`), owned by the platform (`Platform._spawn`), separate from the
dispatcher's tasks. It wakes when a command finishes (the dispatcher's `on_final` hook calls
`command_finished`), when a rollout is created or aborted (`wake`), and otherwise every
`rollouts.poll_s`. A tick looks at no more than `MAX_PER_TICK` rollouts: for each it records
the results of finished commands (`settle_rollout`: which may stop or complete it), and starts
the next batch when the current one has all its results: the release is offered to the batch's
devices (`iotbiz.releases.prepare_update`) and their update commands created and linked in one
store transaction, which does nothing if that batch has started already. So a platform killed
at any point and started again goes on where it was, and no device gets its update twice.

Failure policy: a StoreError never ends the task (logged once per outage, backed off); a
release removed in the middle of a rollout stops it ("release ... is gone").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from iotbiz import releases
from iotbiz.dispatch import StoreOutage
from iotbiz.errors import ConflictError, NotFoundError, StoreError
from iotbiz.models import Command
from iotbiz.settings import RolloutSettings
from iotbiz.store.interface import PlatformStore

log = logging.getLogger(__name__)

MAX_PER_TICK = 100
RETRY_START_S = 0.5
RETRY_CAP_S = 10.0
ENGINE_ACTOR = "rollouts"


class RolloutEngine:
    def __init__(
        self,
        store: PlatformStore,
        settings: RolloutSettings,
        *,
        commands_queued: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._settings = settings
        self._commands_queued = commands_queued
        self._clock = clock
        self._wakeup = asyncio.Event()
        self.ticks = 0
        self.batches_started = 0
        self._outage = StoreOutage("rollouts", (RETRY_START_S, RETRY_CAP_S))

    def wake(self) -> None:
        self._wakeup.set()

    def command_finished(self, command: Command) -> None:
        """The dispatcher's hook: an update command finished, perhaps one of a rollout."""
        if command.action == "update":
            self._wakeup.set()

    @property
    def store_failures(self) -> int:
        return self._outage.failures

    async def run(self) -> None:
        """Look after the running rollouts until cancelled."""
        while True:
            if self._outage.delay_s:
                await asyncio.sleep(self._outage.delay_s)
            else:
                try:
                    async with asyncio.timeout(self._settings.poll_s):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass
            self._wakeup.clear()
            try:
                more = await self.tick()
            except StoreError as exc:
                self._outage.failed(exc)
                continue
            self._outage.recovered()
            if more:
                self._wakeup.set()

    async def tick(self) -> bool:
        """One pass over the rollouts to follow; True if there is more to do at once."""
        self.ticks += 1
        ids = await self._store.rollouts_to_follow(limit=MAX_PER_TICK)
        started = False
        for rollout_id in ids:
            batch = await self._store.settle_rollout(rollout_id)
            if batch is not None:
                await self._start_batch(rollout_id, batch)
                started = True
        return started or len(ids) >= MAX_PER_TICK

    async def _start_batch(self, rollout_id: str, batch: int) -> None:
        rollout = await self._store.get_rollout(rollout_id)
        if rollout is None or not rollout.running:
            return
        names = await self._store.batch_names(rollout_id, batch)
        args: dict[str, Any] = {"app": rollout.app, "version": rollout.version}
        if rollout.force:
            args["force"] = True
        try:
            filled, _ = await releases.prepare_update(self._store, names, args)
        except ValueError as exc:  # the release was removed since the rollout started
            await self._stop(rollout_id, f"release {rollout.app} {rollout.version} is gone: {exc}")
            return
        commands = await self._store.start_rollout_batch(
            rollout_id, batch, filled, expires_at=self._clock() + rollout.timeout_s
        )
        self.batches_started += 1
        log.info(
            "rollout %s: batch %d of %d started (%d update command(s))",
            rollout_id,
            batch + 1,
            rollout.batches,
            len(commands),
        )
        if commands:
            self._commands_queued()
        else:
            self._wakeup.set()  # every device of the batch had gone: settle it at once

    async def _stop(self, rollout_id: str, reason: str) -> None:
        try:
            await self._store.end_rollout(rollout_id, "stopped", reason, ENGINE_ACTOR)
        except (NotFoundError, ConflictError):
            return
        log.warning("rollout %s: stopped (%s)", rollout_id, reason)
