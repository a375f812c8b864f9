"""Refusals that matter, in the audit log and counted, without letting a flood fill the disk.

The device API notes each refusal (`note`): a registration refused (unknown customer, limit
reached, an activated or revoked device: a takeover attempt), an activation refused (with the
real reason, which the answer does not tell: unknown device, wrong password, expired, revoked),
and a client over the rate limits; the admin API notes a missing or wrong token (or console
session, or CSRF token) and a console login with a wrong token (`admin_auth`). Each is counted at
once (`iotbiz_refusals_total{step, reason}`). The audit log gets one entry per (what,
device, address, reason) per `WINDOW_S`; repeats within the window are counted into that key's
next entry (`detail.repeats`). Entries are written every `FLUSH_S` in one transaction, at most
`MAX_PENDING` waiting (beyond: counted in `dropped`, never blocking a request), and the throttle
remembers at most `MAX_KEYS` keys (the least recently used go first).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter

from iotbiz.errors import StoreError
from iotbiz.store.interface import PlatformStore

log = logging.getLogger(__name__)

WINDOW_S = 60.0
FLUSH_S = 1.0
MAX_PENDING = 1000
MAX_KEYS = 10_000

Key = tuple[str, str, str, str]  # action, subject, actor, reason


class RefusalAudit:
    def __init__(
        self,
        store: PlatformStore,
        counter: Counter,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._counter = counter
        self._clock = clock
        self._last: OrderedDict[Key, float] = OrderedDict()  # when each key was last audited
        self._repeats: dict[Key, int] = {}
        self._pending: list[tuple[str, str, str, dict[str, Any]]] = []
        self._wakeup = asyncio.Event()
        self.dropped = 0

    def note(self, step: str, subject: str, address: str | None, reason: str) -> None:
        """A refusal of `step` (register, activate, rate_limit) about `subject` (a device name,
        or an address) from `address`; only notes it (called from request handlers)."""
        self._counter.labels(step, reason).inc()
        kind = "admin" if step == "admin_auth" else "device-api"
        actor = f"{kind}:{address or 'unknown'}"
        key = (f"{step}.refused", subject, actor, reason)
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < WINDOW_S:
            self._repeats[key] = self._repeats.get(key, 0) + 1
            return
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
            return
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > MAX_KEYS:
            old, _ = self._last.popitem(last=False)
            self._repeats.pop(old, None)
        detail: dict[str, Any] = {"reason": reason}
        repeats = self._repeats.pop(key, 0)
        if repeats:
            detail["repeats"] = repeats  # refused that many times more since the last entry
        self._pending.append((key[0], subject, actor, detail))
        self._wakeup.set()

    async def flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            await self._store.audit_refusals(batch)
        except StoreError as exc:  # a refusal's record is not worth a retry queue: counted
            self.dropped += len(batch)
            log.debug("refusals not audited: %s", exc)

    async def run(self) -> None:
        """Write what was noted every FLUSH_S while there is something; until cancelled."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await asyncio.sleep(FLUSH_S)
            await self.flush()
