"""Per-app output capture: a rotating log file and the most recent lines in memory.

An app's stdout and stderr share one pipe (so their lines stay in the order the app wrote them);
`AppLog.capture` reads it until end of file. Every line goes at once to an in-memory tail (for
`app.logs`) and to a batch that is appended to `LOG_DIR/NAME.log` in a worker thread, at most every
`FLUSH_INTERVAL_S` seconds or sooner when the batch reaches `BATCH_BYTES` (the reader then waits for
the write, which slows a flooding app down instead of growing memory). The file rotates like
`logging.handlers.RotatingFileHandler`: NAME.log -> NAME.log.1 -> ... -> NAME.log.N, the oldest
dropped. Lines longer than `MAX_LINE_BYTES` are cut; bytes that are not UTF-8 are replaced.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 8 * 1024
FLUSH_INTERVAL_S = 0.5
BATCH_BYTES = 64 * 1024
READ_CHUNK_BYTES = 64 * 1024


class LineSplitter:
    """Turns chunks of bytes into text lines, cutting each at `max_bytes`."""

    def __init__(self, max_bytes: int = MAX_LINE_BYTES) -> None:
        self._max_bytes = max_bytes
        self._partial = bytearray()
        self._skipping = False  # the current line was already cut: drop bytes up to its end

    def feed(self, data: bytes) -> list[str]:
        lines: list[str] = []
        start = 0
        while start < len(data):
            end = data.find(b"\n", start)
            piece = data[start:] if end < 0 else data[start:end]
            if not self._skipping:
                self._partial += piece
                if len(self._partial) > self._max_bytes:
                    lines.append(_decode(self._partial[: self._max_bytes]))
                    self._partial.clear()
                    self._skipping = True
            if end < 0:
                break
            if self._skipping:
                self._skipping = False
            else:
                lines.append(_decode(self._partial))
                self._partial.clear()
            start = end + 1
        return lines

    def finish(self) -> list[str]:
        """The last line when the output did not end with a newline."""
        rest = [] if self._skipping or not self._partial else [_decode(self._partial)]
        self._partial.clear()
        self._skipping = False
        return rest


def _decode(raw: bytes | bytearray) -> str:
    return bytes(raw).decode("utf-8", errors="replace").removesuffix("\r")


class AppLog:
    """The output of one app: `path` rotated at `max_bytes` keeping `backups` old files, and the
    last `tail_lines` lines in memory. Used from the event loop only; files are written in a
    thread."""

    def __init__(self, path: Path, *, max_bytes: int, backups: int, tail_lines: int) -> None:
        self.path = path
        self._max_bytes = max_bytes
        self._backups = backups
        self._tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._write_lock = asyncio.Lock()
        self._write_failing = False

    def write(self, line: str) -> None:
        """Record one line (without its newline): into the tail now, into the file soon."""
        self._tail.append(line)
        self._pending.append(line)
        self._pending_bytes += len(line) + 1

    def tail(self, lines: int) -> list[str]:
        """The last `lines` lines, oldest first."""
        if lines <= 0:
            return []
        kept = list(self._tail)
        return kept[-lines:]

    async def flush(self) -> None:
        """Append the pending lines to the file (in a thread)."""
        async with self._write_lock:
            if not self._pending:
                return
            batch, self._pending, self._pending_bytes = self._pending, [], 0
            try:
                await asyncio.to_thread(self._append, batch)
            except OSError as exc:
                if not self._write_failing:  # warn once per failing stretch, not per batch
                    log.warning("cannot write %s: %s (output kept in memory only)", self.path, exc)
                self._write_failing = True
            else:
                self._write_failing = False

    async def capture(self, read_fd: int) -> None:
        """Read the pipe `read_fd` (which this takes over and closes) to its end, recording its
        lines; flushes what is pending on the way out, also when cancelled."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_CHUNK_BYTES)
        pipe = os.fdopen(read_fd, "rb", buffering=0)
        try:
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), pipe
            )
        except BaseException:
            pipe.close()
            raise
        splitter = LineSplitter()
        last_flush = time.monotonic()
        try:
            while True:
                # Wait for output, but no longer than until the pending lines are due on disk.
                due = last_flush + FLUSH_INTERVAL_S - time.monotonic() if self._pending else None
                chunk: bytes | None = None
                try:
                    async with asyncio.timeout(None if due is None else max(due, 0.0)):
                        chunk = await reader.read(READ_CHUNK_BYTES)
                except TimeoutError:
                    pass
                if chunk == b"":
                    break
                for line in splitter.feed(chunk or b""):
                    self.write(line)
                now = time.monotonic()
                if self._pending_bytes >= BATCH_BYTES or now - last_flush >= FLUSH_INTERVAL_S:
                    await self.flush()
                    last_flush = now
        finally:
            transport.close()
            for line in splitter.finish():
                self.write(line)
            await self.flush()

    def _append(self, lines: list[str]) -> None:
        """Append `lines` to the file, rotating it on the way (runs in a worker thread)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stream = self.path.open("ab")
        try:
            size = stream.tell()
            for line in lines:
                data = (line + "\n").encode("utf-8", errors="replace")
                if size and size + len(data) > self._max_bytes:
                    stream.close()
                    self._rotate()
                    stream = self.path.open("ab")
                    size = 0
                stream.write(data)
                size += len(data)
        finally:
            stream.close()

    def _rotate(self) -> None:
        if self._backups <= 0:
            self.path.unlink(missing_ok=True)
            return
        for index in range(self._backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{index + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))
