"""Retention: the task that applies the `history.*` limits (policy in `iotbiz.store.history`).

Every `prune_interval_s` one pass deletes telemetry samples and device events past their age,
events beyond the per-device cap, and finished commands past `commands_keep_s`, in transactions
of at most `prune_batch` devices or rows (other writers get the store between two of them). A
store failure is logged (once per outage) and the pass tried again at the next interval; it never
ends the task.
"""

from __future__ import annotations

import asyncio
import logging

from iotbiz.errors import StoreError
from iotbiz.settings import HistorySettings
from iotbiz.store.interface import PlatformStore

log = logging.getLogger(__name__)


class Retention:
    def __init__(self, store: PlatformStore, settings: HistorySettings) -> None:
        self._store = store
        self._settings = settings
        self._failing = False
        self.passes = 0
        self.deleted = 0

    async def prune_once(self) -> int:
        """One pass; the rows deleted. StoreError if the store fails on the way."""
        settings = self._settings
        deleted = await self._store.prune_history(
            samples_keep_s=settings.samples_keep_s,
            events_keep_s=settings.events_keep_s,
            events_per_device=settings.events_per_device,
            batch=settings.prune_batch,
        )
        before = self._store.now() - settings.commands_keep_s
        while True:
            count = await self._store.prune_commands(before=before, limit=settings.prune_batch)
            deleted += count
            if count < settings.prune_batch:
                break
        self.passes += 1
        self.deleted += deleted
        return deleted

    async def run(self) -> None:
        """A pass every `prune_interval_s` until cancelled."""
        while True:
            await asyncio.sleep(self._settings.prune_interval_s)
            try:
                deleted = await self.prune_once()
            except StoreError as exc:
                if not self._failing:
                    log.warning("retention pass failed, tried again later: %s", exc)
                self._failing = True
                continue
            if self._failing:
                log.info("retention passes work again")
                self._failing = False
            log.debug("retention pass deleted %d row(s)", deleted)
