"""Bounded on-disk queues of outgoing messages, sent in order and acknowledged by id.

The agent has two: `outbox.jsonl` (telemetry and app events) and `replies.jsonl` (command
replies). `put` appends a JSON line `{"id", "topic", "payload", "qos"}` (flushed and fsynced, so
a killed agent loses nothing it accepted). Ids are sequence numbers that only grow, kept in the
lines, so a restart goes on numbering after the last one on disk. The link's sender takes entries
from the head, publishes them with QoS 1 and `done(ids)` removes exactly those it published:
whatever was put or dropped meanwhile is not touched.

Policy when full: the OLDEST entries are dropped, counted (persisted in `<name>.dropped`) and
reported in telemetry. For replies this is recoverable: the platform may send the command again
and the agent answers it from the replies it remembers by id (`commands.REMEMBERED`), without
running it twice; and telemetry, however much of it piles up offline, never pushes a reply out
of its own queue. A message bigger than `max_message_bytes` (as an MQTT PUBLISH packet) can
never be delivered (the broker would close the connection and the message would be resent after
every reconnect, blocking the queue for ever): it is refused at `put`, logged and counted as
dropped. File work runs in a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iotbiz.agent.files import read_json, write_atomic, write_json

log = logging.getLogger(__name__)

PUBLISH_OVERHEAD = 9  # fixed header (at most 5), topic length (2) and packet id (2)
NO_LIMIT = 256 * 1024 * 1024  # the MQTT maximum remaining length


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int = 1

    @property
    def packet_bytes(self) -> int:
        """The size of this message as an MQTT PUBLISH packet."""
        return PUBLISH_OVERHEAD + len(self.topic.encode()) + len(self.payload)


@dataclass(frozen=True, slots=True)
class Queued:
    """A message in an outbox, with its id (acknowledge it with `Outbox.done([id])`)."""

    id: int
    message: Message

    def to_line(self) -> bytes:
        m = self.message
        record = {"id": self.id, "topic": m.topic, "payload": m.payload.decode(), "qos": m.qos}
        return json.dumps(record, separators=(",", ":")).encode() + b"\n"


class Outbox:
    def __init__(
        self,
        folder: Path,
        max_messages: int,
        *,
        name: str = "outbox",
        max_message_bytes: int = NO_LIMIT,
    ) -> None:
        self.name = name
        self._path = folder / f"{name}.jsonl"
        self._dropped_path = folder / f"{name}.dropped"
        self._max = max_messages
        self._max_bytes = max_message_bytes
        self._queue: deque[Queued] = deque()
        self._next_id = 1
        self._lock = asyncio.Lock()
        self.available = asyncio.Event()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._queue)

    async def load(self) -> None:
        """Read what a previous run left (call once, at start)."""
        entries, dropped = await asyncio.to_thread(self._read)
        self._queue.extend(entries)
        self.dropped = dropped
        if self._queue:
            self._next_id = self._queue[-1].id + 1
            log.info("%s: %d messages from the previous run to send", self.name, len(self._queue))
            self.available.set()

    def _read(self) -> tuple[list[Queued], int]:
        entries: list[Queued] = []
        try:
            lines = self._path.read_bytes().splitlines()
        except FileNotFoundError:
            lines = []
        last_id = 0
        for line in lines:
            try:
                record: Any = json.loads(line)
                message = Message(record["topic"], record["payload"].encode(), record["qos"])
                raw_id = record.get("id")  # lines written before ids existed have none
            except (ValueError, KeyError, TypeError, AttributeError):
                log.warning("%s: skipped a damaged line", self.name)  # e.g. torn by a power cut
                continue
            entry_id = raw_id if isinstance(raw_id, int) and raw_id > last_id else last_id + 1
            entries.append(Queued(entry_id, message))
            last_id = entry_id
        saved = read_json(self._dropped_path)
        dropped = saved if isinstance(saved, int) else 0
        fitting = [entry for entry in entries if entry.message.packet_bytes <= self._max_bytes]
        if len(fitting) < len(entries):  # left by an agent with a higher limit
            log.warning(
                "%s: dropped %d messages too large to send", self.name, len(entries) - len(fitting)
            )
            dropped += len(entries) - len(fitting)
        return fitting[-self._max :], dropped

    async def put(self, message: Message) -> None:
        if message.packet_bytes > self._max_bytes:
            async with self._lock:
                self.dropped += 1
                log.error(
                    "%s: dropped a message to %s of %d bytes: larger than the %d bytes that fit "
                    "in an MQTT packet",
                    self.name,
                    message.topic,
                    message.packet_bytes,
                    self._max_bytes,
                )
                await asyncio.to_thread(write_json, self._dropped_path, self.dropped)
            return
        async with self._lock:
            entry = Queued(self._next_id, message)
            self._next_id += 1
            self._queue.append(entry)
            overflow = len(self._queue) - self._max
            if overflow > 0:
                for _ in range(overflow):
                    self._queue.popleft()
                self.dropped += overflow
                log.warning("%s full: dropped the %d oldest message(s)", self.name, overflow)
                await asyncio.to_thread(self._rewrite, list(self._queue), self.dropped)
            else:
                await asyncio.to_thread(self._append, entry)
        self.available.set()

    def head(self, count: int) -> list[Queued]:
        """Up to `count` entries from the head, oldest first (they stay queued)."""
        return [self._queue[i] for i in range(min(count, len(self._queue)))]

    async def done(self, ids: Collection[int]) -> None:
        """Remove the entries with these ids (the broker acknowledged them); ids that are no
        longer queued (dropped meanwhile) are ignored."""
        wanted = set(ids)
        async with self._lock:
            kept = [entry for entry in self._queue if entry.id not in wanted]
            if len(kept) != len(self._queue):
                self._queue = deque(kept)
                await asyncio.to_thread(self._rewrite, kept, None)
            if not self._queue:
                self.available.clear()

    def _append(self, entry: Queued) -> None:
        with self._path.open("ab") as stream:
            stream.write(entry.to_line())
            stream.flush()
            os.fsync(stream.fileno())

    def _rewrite(self, entries: list[Queued], dropped: int | None) -> None:
        write_atomic(self._path, b"".join(entry.to_line() for entry in entries))
        if dropped is not None:
            write_json(self._dropped_path, dropped)
