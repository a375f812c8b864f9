"""The console's live updates: `GET /api/v1/admin/stream`, server-sent events, coalesced.

Presence tells the feed, after each flush the store took, which devices it wrote
(`PresenceRecorder.on_recorded`). Each open stream gathers those names until it next writes: one
event at most every `console.stream_interval_s`, naming at most `MAX_CHANGED` devices (`more`
says that more changed: the page refetches what it shows), with the fleet's online and total
counts, read from the store at most once per interval for all streams together. So 10,000
devices reporting every 10 s cost a console one small event a second, not 1,000 messages.

    event: devices
    data: {"changed": ["acme/dev-1"], "more": false, "online": 812, "total": 1000}

The first event follows at once (`changed` empty, `more` true: "fetch what you show"); a
comment line keeps idle connections open through proxies every `KEEPALIVE_S`. At most
`console.max_streams` streams are open at once (more: 503); a stream whose reader went away is
closed within `POLL_S`, one whose reader stops reading by its bounded write, and all streams end
when the app shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Collection, Iterator

from aiohttp import web

from iotbiz.errors import ServiceUnavailable, StoreError
from iotbiz.names import DeviceName
from iotbiz.registrar.admin_input import Query
from iotbiz.store.interface import PlatformStore

log = logging.getLogger(__name__)

MAX_CHANGED = 500
KEEPALIVE_S = 15.0
POLL_S = 1.0  # how soon a stream notices that its reader went away
WRITE_TIMEOUT_S = 10.0  # a reader that takes no bytes for this long is dropped


class _Follower:
    """One open stream's changes since its last event."""

    __slots__ = ("changed", "more", "wakeup")

    def __init__(self) -> None:
        self.changed: set[str] = set()
        self.more = True  # the first event: everything may have changed
        self.wakeup = asyncio.Event()
        self.wakeup.set()

    def note(self, names: Collection[DeviceName]) -> None:
        if not self.more:
            for name in names:
                if len(self.changed) >= MAX_CHANGED:
                    self.more = True
                    break
                self.changed.add(str(name))
        self.wakeup.set()

    def take(self) -> tuple[list[str], bool]:
        changed, more = sorted(self.changed), self.more
        self.changed, self.more = set(), False
        self.wakeup.clear()
        return ([] if more else changed), more


class FleetFeed:
    def __init__(
        self,
        store: PlatformStore,
        *,
        interval_s: float,
        max_streams: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self.interval_s = interval_s
        self.max_streams = max_streams
        self._clock = clock
        self._followers: set[_Follower] = set()
        self._counts = (0, 0)
        self._counted_at: float | None = None
        self._count_lock = asyncio.Lock()
        self.closed = asyncio.Event()

    @property
    def streams(self) -> int:
        return len(self._followers)

    def note(self, names: Collection[DeviceName]) -> None:
        """Presence wrote these devices (called from its flush: only notes and returns)."""
        for follower in self._followers:
            follower.note(names)

    @contextlib.contextmanager
    def follow(self) -> Iterator[_Follower]:
        if len(self._followers) >= self.max_streams:
            raise ServiceUnavailable(f"too many live streams open (at most {self.max_streams})")
        follower = _Follower()
        self._followers.add(follower)
        try:
            yield follower
        finally:
            self._followers.discard(follower)

    def close(self) -> None:
        self.closed.set()
        for follower in self._followers:
            follower.wakeup.set()

    async def counts(self) -> tuple[int, int]:
        """(online, total) devices, read at most once per interval for every stream."""
        async with self._count_lock:
            now = self._clock()
            if self._counted_at is None or now - self._counted_at >= self.interval_s:
                self._counted_at = now
                try:
                    _, online = await self._store.find_devices(online=True, limit=1)
                    _, total = await self._store.find_devices(limit=1)
                except StoreError as exc:  # the last counts stand; the API answers 503 meanwhile
                    log.debug("live stream counts not read: %s", exc)
                else:
                    self._counts = (online, total)
            return self._counts


FLEET_FEED = web.AppKey("fleet_feed", FleetFeed)


async def stream(request: web.Request) -> web.StreamResponse:
    """The event stream of the fleet's changes (module docstring)."""
    Query(request, ())  # no parameters: an unknown one is a 400
    feed = request.app[FLEET_FEED]
    with feed.follow() as follower:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # nginx: pass events through as they come
            }
        )
        await response.prepare(request)
        try:
            quiet_since = time.monotonic()
            while not feed.closed.is_set():
                if request.transport is None or request.transport.is_closing():
                    break  # the reader went away: free its place now, not at the next write
                try:
                    async with asyncio.timeout(POLL_S):
                        await follower.wakeup.wait()
                except TimeoutError:
                    if time.monotonic() - quiet_since >= KEEPALIVE_S:
                        await _write(response, b": keep-alive\n\n")
                        quiet_since = time.monotonic()
                    continue
                if feed.closed.is_set():
                    break
                changed, more = follower.take()
                online, total = await feed.counts()
                data = {"changed": changed, "more": more, "online": online, "total": total}
                await _write(response, b"event: devices\ndata: %s\n\n" % json.dumps(data).encode())
                quiet_since = time.monotonic()
                # coalesce what comes meanwhile (a shutdown ends the wait)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(feed.interval_s):
                        await feed.closed.wait()
        except (ConnectionResetError, TimeoutError):
            log.debug("live stream to %s closed by the reader", request.remote)
    return response


async def _write(response: web.StreamResponse, data: bytes) -> None:
    async with asyncio.timeout(WRITE_TIMEOUT_S):
        await response.write(data)


async def close_feed(app: web.Application) -> None:
    """on_shutdown: end every stream, so that stopping does not wait for open consoles."""
    app[FLEET_FEED].close()
