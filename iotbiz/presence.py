"""Presence: what the platform knows of each device's connection, status and telemetry.

Fed by the broker's connect/disconnect events and by the device messages the platform's service
client receives; written to the store in batches (one transaction per `flush_s`), so that 2,000
devices sending telemetry do not cost 2,000 transactions. Updates to one device within a batch are
merged, the later value of each field winning. A killed platform loses at most `flush_s` of
presence, which is a cache of the devices' own state, and marks every device offline at start.

When the store fails (a full disk, a locked or broken file), the batch stays pending, merged with
the updates that arrive meanwhile, so it holds at most one update per device (devices are the
only names that reach presence: the broker has authenticated them); it is tried again after
`RETRY_START_S`, the wait doubling up to `RETRY_CAP_S` while the failure lasts. One warning when
an outage starts and one line when it ends, not one per flush.

Telemetry, the one high-rate message, is kept as the bytes the device sent and parsed at the next
flush, only the latest message of each device: a device sending many messages between two flushes
costs one JSON parse, and the broker's message path (which hands telemetry over directly, see
`iotbiz.broker.embedded`) does no JSON work at all.

History (policy in `iotbiz.store.history`): the first telemetry flushed in each
`history.sample_interval_s` of a device (intervals aligned to the clock) also becomes a sample,
and every event a device publishes on `events` (a JSON object of at most
`history.max_event_bytes`) is recorded; both go into the store with a presence batch, in the same
transaction. Events go with the next flush. Samples are held for `history.write_interval_s` and
then written together, device by device: a sample is ~112 bytes, but a transaction writes every
page it touches, and samples are stored in device order, so writing 33 samples of 33 devices (one
flush at 10,000 devices) wrote 52 pages (208 KB) to the WAL: 92 GB a day, twice that with the
checkpoints, for 1.6 GB of samples. Held for 10 minutes, each device's samples share a page. A
platform killed loses the samples it held (history, not state; stopping writes them). At most
`history.max_pending_samples` samples and `history.max_pending_events` events wait: beyond that,
new samples and the oldest events are dropped, counted.

External broker (`external_broker=True`): there are no connect or disconnect events, and a
platform restart does not disconnect the devices. A retained `status` replayed on subscribe
counts (the broker kept it while the platform was away and replaced it with the will if the
device dropped). A device whose status this leader has not heard yet (it stayed connected
through a restart) turns online with any other message it sends live (its telemetry, every
`telemetry_interval_s`). Once a status was heard, only statuses count: the agent stops with an
`offline` status and may still send a last telemetry before it disconnects (seen: it stayed
online for ever when telemetry counted after that). Measured on RabbitMQ 3.10.8: retained
messages reach only subscriptions without wildcards, so the platform's `devices/+/+/...` gets
none, and after a restart a device that stayed connected is online again with its next
telemetry. What each status said is kept per device, at most the fleet's active devices. A
broker node that dies sends none of its devices' wills: `run_silence_timeout` marks offline the
online devices silent for `broker.presence_timeout_s`.

Hooks for the rest of the platform (the command dispatcher): `on_online` callbacks get a device's
name when it connects or says `online` live; `on_reply` callbacks get a device's `reply` payloads.
They are called synchronously from the broker's and the service client's message paths, so they
must only note the fact and return. `on_recorded` callbacks (the console's live feed) get, after
each flush the store took, the names of the devices whose presence or events it wrote: what a
reader of the store sees changed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from typing import Any

from iotbiz import topics
from iotbiz.errors import StoreError
from iotbiz.models import PresenceUpdate, TelemetrySample
from iotbiz.names import DeviceName
from iotbiz.settings import HistorySettings
from iotbiz.store.interface import PlatformStore

log = logging.getLogger(__name__)

FLUSH_S = 0.2
# Held samples written in one presence flush at most (whole devices): 100,000 took 1.05 s in one
# transaction, holding up every other write; about 20,000 take 0.2 s.
SAMPLES_PER_FLUSH = 20_000
RETRY_START_S = 0.5
RETRY_CAP_S = 10.0


class PresenceRecorder:
    def __init__(
        self,
        store: PlatformStore,
        *,
        flush_s: float = FLUSH_S,
        retry_s: tuple[float, float] = (RETRY_START_S, RETRY_CAP_S),
        clock: Callable[[], float] = time.time,
        history: HistorySettings | None = None,
        external_broker: bool = False,
    ) -> None:
        self._store = store
        self._external = external_broker  # see "External broker" in the module docstring
        # external broker: what each device's last status said since this leader started
        # (True: online), absent while unknown
        self._said: dict[DeviceName, bool] = {}
        self._flush_s = flush_s
        self._retry_start_s, self._retry_cap_s = retry_s
        self._clock = clock
        self._pending: dict[DeviceName, PresenceUpdate] = {}
        self._telemetry: dict[DeviceName, tuple[float, bytes]] = {}  # raw, parsed at flush
        self._wakeup = asyncio.Event()
        self._retry_s = 0.0  # 0: the store is writing; else the wait before the next try
        self.malformed_messages = 0  # status and telemetry payloads that are not a JSON object
        self.failed_flushes = 0  # batches the store could not write (kept and tried again)
        self._history = history or HistorySettings()
        self._sampled: dict[DeviceName, int] = {}  # interval of each device's latest sample
        self._samples: dict[DeviceName, list[TelemetrySample]] = {}  # held, see the docstring
        self._sample_count = 0
        self._samples_due_at: float | None = None  # when the held samples are written
        self._events: deque[tuple[DeviceName, float, dict[str, Any]]] = deque()
        self.dropped_samples = 0  # more than max_pending_samples waited
        self.dropped_events = 0  # too large, or the oldest while too many waited
        self.on_online: list[Callable[[DeviceName], None]] = []
        self.on_reply: list[Callable[[DeviceName, bytes], None]] = []
        self.on_recorded: list[Callable[[Collection[DeviceName]], None]] = []

    @property
    def pending_devices(self) -> int:
        """Devices whose updates wait for the next flush (at most one entry per device)."""
        return len(self._pending.keys() | self._telemetry.keys())

    @property
    def pending_history(self) -> int:
        """Samples and events waiting for the next flush."""
        return self._sample_count + len(self._events)

    def connected(self, name: DeviceName) -> None:
        self._note(PresenceUpdate(name, self._clock(), online=True))
        self._came_online(name)

    def _came_online(self, name: DeviceName) -> None:
        for callback in self.on_online:
            callback(name)

    def disconnected(self, name: DeviceName) -> None:
        self._note(PresenceUpdate(name, self._clock(), online=False))

    def status(self, name: DeviceName, status: dict[str, Any], *, live: bool) -> None:
        """A status message. Only a live one (not a retained copy replayed on subscribe, unless
        the broker is an external one) says whether the device is online now."""
        says = live or self._external
        online = status.get("state") == "online" if says else None
        self._note(PresenceUpdate(name, self._clock(), online=online, status=status))
        if self._external and online is not None:
            self._said[name] = online
        if online:
            self._came_online(name)  # the agent says so after subscribing to its commands

    def _alive(self, name: DeviceName) -> None:
        """External broker: a message from a device whose status this leader has not heard
        shows it connected (see the module docstring): it turns online."""
        if name not in self._said:
            self._said[name] = True
            self._note(PresenceUpdate(name, self._clock(), online=True))
            self._came_online(name)

    def forget_online(self) -> None:
        """Forget what the devices' statuses said (the store was just marked all offline: a
        new leader starts over)."""
        self._said.clear()

    def went_silent(self, names: Iterable[DeviceName]) -> None:
        """External broker: these devices were marked offline for their silence; the next
        message any of them sends turns it online again."""
        for name in names:
            self._said.pop(name, None)

    async def run_silence_timeout(self, timeout_s: float, *, every_s: float | None = None) -> None:
        """External broker (a leader's task, until cancelled): every `timeout_s / 4`, the
        online devices not seen for `timeout_s` are marked offline. A broker node that dies
        sends none of its devices' wills, so without it they would stay online for ever; a
        device still there (its telemetry comes every `telemetry_interval_s`) is online again
        with its next message. A store failure is logged once per outage and tried again."""
        failing = False
        while True:
            await asyncio.sleep(timeout_s / 4 if every_s is None else every_s)
            try:
                names = await self._store.mark_silent_offline(self._clock() - timeout_s)
            except StoreError as exc:
                if not failing:
                    log.warning("presence: silent devices not marked offline (retrying): %s", exc)
                    failing = True
                continue
            failing = False
            if not names:
                continue
            self.went_silent(names)
            log.info("presence: %d device(s) silent for %.0f s marked offline", len(names),
                     timeout_s)  # fmt: skip
            for callback in self.on_recorded:
                callback(names)

    def telemetry_payload(self, name: DeviceName, payload: bytes) -> None:
        """A telemetry message as published; only the latest per device is parsed, at flush."""
        self._telemetry[name] = (self._clock(), payload)
        self._wakeup.set()

    def seen(self, name: DeviceName) -> None:
        self._note(PresenceUpdate(name, self._clock()))

    def message(self, name: DeviceName, suffix: str, payload: bytes, *, retained: bool) -> None:
        """A message a device published on `devices/{name}/{suffix}`."""
        if self._external and not retained and suffix != topics.STATUS:
            self._alive(name)
        if suffix == topics.TELEMETRY:
            self.telemetry_payload(name, payload)
        elif suffix == topics.STATUS:
            body = self._parse(name, suffix, payload)
            if body is None:
                return
            self.status(name, body, live=not retained)
        elif suffix == topics.EVENTS:
            self.seen(name)
            self.event(name, payload)
        elif suffix == topics.REPLY:
            self.seen(name)
            for callback in self.on_reply:
                callback(name, payload)
        else:
            self.seen(name)

    def event(self, name: DeviceName, payload: bytes) -> None:
        """An `events` message: recorded with the next flush (see the module docstring)."""
        if len(payload) > self._history.max_event_bytes:
            self.dropped_events += 1
            log.debug("event from %s of %d bytes not recorded (too large)", name, len(payload))
            return
        body = self._parse(name, topics.EVENTS, payload)
        if body is None:
            return
        if len(self._events) >= self._history.max_pending_events:
            self._events.popleft()
            self.dropped_events += 1
        self._events.append((name, self._clock(), body))
        self._wakeup.set()

    def _sample(self, name: DeviceName, at: float, telemetry: dict[str, Any]) -> None:
        interval = int(at // self._history.sample_interval_s)
        if self._sampled.get(name) == interval:
            return
        sample = TelemetrySample.from_telemetry(at, telemetry)
        if sample is None:
            return
        self._sampled[name] = interval
        if self._sample_count >= self._history.max_pending_samples:
            self.dropped_samples += 1
            return
        self._samples.setdefault(name, []).append(sample)
        self._sample_count += 1
        if self._samples_due_at is None:
            self._samples_due_at = at + self._history.write_interval_s

    def _parse(self, name: DeviceName, suffix: str, payload: bytes) -> dict[str, Any] | None:
        try:
            body = json.loads(payload)
        except (ValueError, RecursionError):
            body = None
        if not isinstance(body, dict):
            self.malformed_messages += 1
            log.debug("%s from %s is not a JSON object: ignored", suffix, name)
            return None
        return body

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

    async def flush(self, *, final: bool = False) -> bool:
        """Write what is pending now, the held samples when they are due (all of them when
        `final`: on shutdown). Returns False when the store failed: the batch is then kept, to be
        merged with newer updates and written later."""
        telemetry, self._telemetry = self._telemetry, {}
        for name, (seen_at, payload) in telemetry.items():
            body = self._parse(name, topics.TELEMETRY, payload)
            if body is not None:  # a malformed message is ignored, as a malformed status is
                self._note(PresenceUpdate(name, seen_at, telemetry=body))
                self._sample(name, seen_at, body)
        samples: dict[DeviceName, list[TelemetrySample]] = {}
        due = self._samples_due_at
        if self._samples and (final or (due is not None and self._clock() >= due)):
            samples = self._take_samples(None if final else SAMPLES_PER_FLUSH)
        if not self._pending and not samples and not self._events:
            return True
        batch, self._pending = self._pending, {}
        events, self._events = self._events, deque()
        rows = [(name, sample) for name in sorted(samples) for sample in samples[name]]
        try:
            await self._store.record_presence(batch.values(), samples=rows, events=events)
        except StoreError as exc:
            self._keep(batch)
            self._keep_history(samples, events)
            self.failed_flushes += 1
            if not self._retry_s:  # healthy -> failing: once per outage, not once per flush
                log.warning(
                    "presence not recorded, kept and retried until the store works: %s", exc
                )
            else:
                log.debug("presence still not recorded: %s", exc)
            self._retry_s = min(max(self._retry_s * 2, self._retry_start_s), self._retry_cap_s)
            return False
        if self._retry_s:  # failing -> healthy
            log.info("presence recorded again (%d failed flushes so far)", self.failed_flushes)
            self._retry_s = 0.0
        if self.on_recorded and (batch or events):
            names = batch.keys() | {name for name, _, _ in events}
            for callback in self.on_recorded:
                callback(names)
        if samples and self._samples_due_at is not None:
            self._wakeup.set()  # more held samples are due: the next part at the next flush
        return True

    def _take_samples(self, limit: int | None) -> dict[DeviceName, list[TelemetrySample]]:
        """Held samples to write now, whole devices in name order, about `limit` of them (all
        with None); the rest stay held, and due."""
        taken: dict[DeviceName, list[TelemetrySample]] = {}
        count = 0
        for name in sorted(self._samples):
            if limit is not None and count >= limit:
                break
            taken[name] = self._samples.pop(name)
            count += len(taken[name])
        self._sample_count -= count
        if not self._samples:
            self._samples_due_at = None
        return taken

    def _keep(self, batch: dict[DeviceName, PresenceUpdate]) -> None:
        """Put a batch the store refused back under the updates that arrived since."""
        newer, self._pending = self._pending, batch
        for update in newer.values():
            self._note(update)

    def _keep_history(
        self,
        samples: dict[DeviceName, list[TelemetrySample]],
        events: deque[tuple[DeviceName, float, dict[str, Any]]],
    ) -> None:
        """Put refused samples and events back, within their bounds (the samples held since
        stay, they are newer; the oldest events are dropped first). They are due at once."""
        if samples:
            for name, newer in self._samples.items():
                samples.setdefault(name, []).extend(newer)
            self._samples = samples
            self._sample_count = sum(len(held) for held in samples.values())
            self._samples_due_at = self._clock()
        events.extend(self._events)
        while len(events) > self._history.max_pending_events:
            events.popleft()
            self.dropped_events += 1
        self._events = events

    async def run(self) -> None:
        """Flush every `flush_s` while there is something to write (after a failure, again
        after the retry wait, even if nothing new arrived); runs until cancelled."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await asyncio.sleep(self._retry_s or self._flush_s)
            if not await self.flush():
                self._wakeup.set()
