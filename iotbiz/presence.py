"""Presence: what the platform knows of each device's connection, status and telemetry.

Fed by the broker's connect/disconnect events and by the device messages the platform's service
client receives; written to the store in batches (one transaction per `flush_s`), so that 2,000
devices sending telemetry do not cost 2,000 transactions. Updates to one device within a batch are
merged, the later value of each field winning. A killed platform loses at most `flush_s` of
presence, which is a cache of the devices' own state, and marks every device offline at start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from iotbiz.errors import IotbizError
from iotbiz.models import PresenceUpdate
from iotbiz.names import DeviceName
from iotbiz.store import Store

log = logging.getLogger(__name__)

FLUSH_S = 0.2


class PresenceRecorder:
    def __init__(
        self, store: Store, *, flush_s: float = FLUSH_S, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._flush_s = flush_s
        self._clock = clock
        self._pending: dict[DeviceName, PresenceUpdate] = {}
        self._wakeup = asyncio.Event()

    def connected(self, name: DeviceName) -> None:
        self._note(PresenceUpdate(name, self._clock(), online=True))

    def disconnected(self, name: DeviceName) -> None:
        self._note(PresenceUpdate(name, self._clock(), online=False))

    def status(self, name: DeviceName, status: dict[str, Any], *, live: bool) -> None:
        """A status message. Only a live one (not a retained copy replayed on subscribe) says
        whether the device is online now."""
        online = status.get("state") == "online" if live else None
        self._note(PresenceUpdate(name, self._clock(), online=online, status=status))

    def telemetry(self, name: DeviceName, telemetry: dict[str, Any]) -> None:
        self._note(PresenceUpdate(name, self._clock(), telemetry=telemetry))

    def seen(self, name: DeviceName) -> None:
        self._note(PresenceUpdate(name, self._clock()))

    def _note(self, update: PresenceUpdate) -> None:
        previous = self._pending.get(update.name)
        if previous is not None:
            update = dataclasses.replace(
                previous,
                seen_at=max(previous.seen_at, update.seen_at),
                **{
                    field: getattr(update, field)
                    for field in ("online", "status", "telemetry")
                    if getattr(update, field) is not None
                },
            )
        self._pending[update.name] = update
        self._wakeup.set()

    async def flush(self) -> None:
        """Write what is pending now (also called on shutdown)."""
        if not self._pending:
            return
        batch, self._pending = list(self._pending.values()), {}
        try:
            await self._store.record_presence(batch)
        except IotbizError as exc:
            log.warning("presence of %d devices not recorded: %s", len(batch), exc)

    async def run(self) -> None:
        """Flush every `flush_s` while there is something to write; runs until cancelled."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await asyncio.sleep(self._flush_s)
            await self.flush()
