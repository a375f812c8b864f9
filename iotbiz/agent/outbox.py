"""A bounded on-disk queue of outgoing messages (telemetry, events), sent in order.

Every message goes through it: `put` appends a JSON line to `outbox.jsonl` (flushed and fsynced,
so a killed agent loses nothing it accepted); the link's sender publishes from the head with
QoS 1 and `done(n)` removes what the broker acknowledged. While the device is offline the queue
grows up to `max_messages`; past that the OLDEST messages are dropped, counted (persisted in
`outbox.dropped`) and reported in telemetry. File work runs in a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iotbiz.agent.files import read_json, write_atomic, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int = 1

    def to_line(self) -> bytes:
        record = {"topic": self.topic, "payload": self.payload.decode(), "qos": self.qos}
        return json.dumps(record, separators=(",", ":")).encode() + b"\n"


class Outbox:
    def __init__(self, folder: Path, max_messages: int) -> None:
        self._path = folder / "outbox.jsonl"
        self._dropped_path = folder / "outbox.dropped"
        self._max = max_messages
        self._queue: deque[Message] = deque()
        self._lock = asyncio.Lock()
        self.available = asyncio.Event()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._queue)

    async def load(self) -> None:
        """Read what a previous run left (call once, at start)."""
        messages, dropped = await asyncio.to_thread(self._read)
        self._queue.extend(messages)
        self.dropped = dropped
        if self._queue:
            log.info("outbox: %d messages from the previous run to send", len(self._queue))
            self.available.set()

    def _read(self) -> tuple[list[Message], int]:
        messages = []
        try:
            lines = self._path.read_bytes().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                record: Any = json.loads(line)
                messages.append(Message(record["topic"], record["payload"].encode(), record["qos"]))
            except (ValueError, KeyError, TypeError, AttributeError):
                log.warning("outbox: skipped a damaged line")  # e.g. torn by a power cut
        dropped = read_json(self._dropped_path)
        return messages[-self._max :], dropped if isinstance(dropped, int) else 0

    async def put(self, message: Message) -> None:
        async with self._lock:
            self._queue.append(message)
            overflow = len(self._queue) - self._max
            if overflow > 0:
                for _ in range(overflow):
                    self._queue.popleft()
                self.dropped += overflow
                log.warning("outbox full: dropped the %d oldest message(s)", overflow)
                await asyncio.to_thread(self._rewrite, list(self._queue), self.dropped)
            else:
                await asyncio.to_thread(self._append, message)
        self.available.set()

    def head(self, count: int) -> list[Message]:
        """Up to `count` messages from the head, oldest first (they stay queued)."""
        return [self._queue[i] for i in range(min(count, len(self._queue)))]

    async def done(self, count: int) -> None:
        """Remove the `count` oldest messages: the broker has acknowledged them."""
        async with self._lock:
            for _ in range(min(count, len(self._queue))):
                self._queue.popleft()
            await asyncio.to_thread(self._rewrite, list(self._queue), None)
            if not self._queue:
                self.available.clear()

    def _append(self, message: Message) -> None:
        with self._path.open("ab") as stream:
            stream.write(message.to_line())
            stream.flush()
            os.fsync(stream.fileno())

    def _rewrite(self, messages: list[Message], dropped: int | None) -> None:
        write_atomic(self._path, b"".join(m.to_line() for m in messages))
        if dropped is not None:
            write_json(self._dropped_path, dropped)
