"""Leadership: the platform's work that must run in one process at a time.

Several platform processes may share one store (PostgreSQL, behind one external broker). Each
serves the device API, the admin API, the console and the broker's auth callbacks; the LEADER
alone also runs the work that reads or writes the fleet as a whole: presence, command dispatch,
command replies and expiry, retention and rollouts. Which process leads is decided by the
store's leader lock (`iotbiz.store.leader`), released by the database server or the kernel when
its holder dies.

    FOLLOWER -> LEADER     the lock was free: `on_change(True)` (the platform marks every
                           device offline and starts following the devices' topics, whose
                           retained statuses say who is online), then the leader's tasks start
    LEADER -> FOLLOWER     the lock was lost (its session stopped answering): the tasks are
                           cancelled at once, before the server can hand the lock to another,
                           then `on_change(False)`
    LEADER -> STOPPED      the platform stops: `run` is cancelled and stops the tasks; the lock
                           stays held until `release()`, so that the platform's last writes
                           (presence flushed, devices marked offline) are still the leader's

A follower tries the lock every `poll_s`, so a dead leader's successor takes over within
`poll_s` of the lock's release (at once on PostgreSQL when the process died; after the TCP
keep-alive probes when its machine did). The work survives the change because it lives in the
store: queued commands are dispatched by whoever leads, a command sent but not answered is sent
again (the agent answers a repeated id from memory, never running it twice).

A leader task that dies (raises or returns) is a failure of the platform, as any long-lived
task's: `on_failure` is called with its name and the reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from iotbiz.errors import StoreError
from iotbiz.store.leader import LeaderLock

log = logging.getLogger(__name__)

POLL_S = 1.0
STOP_TIMEOUT_S = 5.0

TaskFactory = Callable[[], Coroutine[Any, Any, None]]


class Leader:
    def __init__(
        self,
        lock: LeaderLock,
        tasks: dict[str, TaskFactory],
        *,
        on_failure: Callable[[str, str], None],
        on_change: Callable[[bool], Awaitable[None]] | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        self._lock = lock
        self._factories = tasks
        self._on_failure = on_failure
        self._on_change = on_change
        self._poll_s = poll_s
        self._running: list[asyncio.Task[None]] = []
        self.leading = False
        self.elections = 0  # times this process became the leader
        self._lock_failing = False

    async def run(self) -> None:
        """Try, hold and check the lock until cancelled; then stop the leader's tasks (the lock
        stays held: see `release`)."""
        try:
            while True:
                await self._step()
                await asyncio.sleep(self._poll_s)
        finally:
            await self._stop_tasks()

    async def release(self) -> None:
        """Stop leading and let the lock go (after `run` ended; again: nothing happens)."""
        await self._stop_tasks()
        self.leading = False
        await self._lock.release()

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        """The leader's tasks now running (none while following)."""
        return list(self._running)

    async def step(self) -> None:
        """One round of `run`: take the lock if free, or check it if held (the platform takes
        its first round before it says it started, so a process alone leads at once)."""
        await self._step()

    async def _step(self) -> None:
        try:
            if self.leading:
                if not await self._lock.check():
                    log.error("leader: LEADER -> FOLLOWER (lost %s)", self._lock.name)
                    await self._stop_leading()
            elif await self._lock.try_acquire():
                log.info("leader: FOLLOWER -> LEADER (%s)", self._lock.name)
                await self._start_leading()
            self._lock_failing = False
        except StoreError as exc:
            if not self._lock_failing:
                log.warning("leader: the lock cannot be taken or checked: %s", exc)
                self._lock_failing = True
            if self.leading:  # cannot prove it still holds the lock: step down
                log.error("leader: LEADER -> FOLLOWER (%s)", exc)
                await self._stop_leading()

    async def _start_leading(self) -> None:
        self.leading = True
        self.elections += 1
        if self._on_change is not None:
            await self._on_change(True)
        for name, factory in self._factories.items():
            task = asyncio.create_task(factory(), name=name)
            task.add_done_callback(self._task_done)
            self._running.append(task)

    async def _stop_leading(self) -> None:
        if not self.leading:
            return
        self.leading = False
        await self._stop_tasks()
        if self._on_change is not None:
            await self._on_change(False)

    async def _stop_tasks(self) -> None:
        tasks, self._running = self._running, []
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
            if pending:
                names = ", ".join(sorted(t.get_name() for t in pending))
                log.error("leader: tasks still running %.0f s after cancel: %s",
                          STOP_TIMEOUT_S, names)  # fmt: skip

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() and task not in self._running:
            return  # cancelled by _stop_tasks: the normal end
        exc = None if task.cancelled() else task.exception()
        if task.cancelled():
            reason = "cancelled"
        elif exc is not None:
            reason = f"{type(exc).__name__}: {exc}"
        else:
            reason = "returned"  # these tasks run until cancelled
        log.error("task %s: RUNNING -> FAILED (%s)", task.get_name(), reason, exc_info=exc)
        self._on_failure(task.get_name(), reason)
