"""The command dispatcher: commands from the store to devices' `cmd` topics, replies back.

Public API (the admin API and the CLI): `send(names, action, args, expires_in_s=, actor=)`
queues one command per device and returns `(batch_id, commands)`; `wait(command_id, timeout_s)`
returns the command once it is final or when the time is up.

Three long-lived tasks, owned and started by the platform (`Platform._spawn`):

- `run` publishes, through the platform's service MQTT client (QoS 1, waiting for the PUBACK),
  at most `max_inflight` at once, in batches of `batch_size`: the open commands of every device
  that came online (presence's `on_online`: a broker connect, or a live `online` status, which the
  agent sends after subscribing to `cmd`) go out again, queued and sent-but-unanswered alike, same
  id; and, after a `send` (at once and `RESCAN_AFTER_SEND_S` later) and otherwise every `SCAN_S`
  (or half of `resend_after_s`, if shorter), the queued commands of online devices and the sent
  ones unanswered for `resend_after_s` (created by this process or another one sharing the
  store). That scan reads every open command: 45 ms with 10,000 queued for offline devices, so it
  does not run every `poll_s`. Published commands are marked sent. A repeat is harmless: the
  agent answers an id it has seen from memory, never running it twice.
- `run_replies` applies the devices' replies (presence's `on_reply`), in batches: a reply
  finishes only an open command OF THE DEVICE THAT SENT IT; any other id is ignored and counted.
- `run_expiry` marks open commands past `expires_at` expired, `batch_size` at a time.

Waiters are woken in-process when their command reaches a final state (futures keyed by id), and
poll the store every `WAIT_POLL_S` for commands finished by another process.

Failure policy: a StoreError never ends a task: it is logged once per outage, the task backs off
(`RETRY_START_S` doubling to `RETRY_CAP_S`) and goes on; what it was doing is done again (a
batch of replies is kept and retried, commands are published again: the agent deduplicates).
A publish the broker does not take (service client disconnected) leaves the command as it was.
Bounds: devices that came online are kept once each (a dict); replies waiting for the store at
most `max_pending_replies`, newer ones dropped and counted (their commands are sent again after
`resend_after_s` and answered from the agent's memory); waiters at most `max_waiters`, beyond
which `wait` returns the command as it is without waiting.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from iotbiz import topics
from iotbiz.errors import BrokerUnavailable, NotFoundError, StoreError
from iotbiz.models import Command, CommandReply
from iotbiz.names import DeviceName
from iotbiz.settings import CommandSettings
from iotbiz.store.interface import PlatformStore

log = logging.getLogger(__name__)

RETRY_START_S = 0.5
RETRY_CAP_S = 10.0
WAIT_POLL_S = 1.0
SCAN_S = 10.0
# A send scans at once and again this much later: a device that came online just before the send
# may not be online in the store yet (presence writes every 0.2 s); by then it is.
RESCAN_AFTER_SEND_S = 1.0
MAX_ACTION_LENGTH = 64


class Publisher(Protocol):
    """What the dispatcher publishes through (the registrar's ServiceClient)."""

    connected: asyncio.Event

    async def publish(self, topic: str, payload: bytes) -> None: ...


class StoreOutage:
    """Backoff and once-per-outage logging for one task's store failures (the dispatcher's
    tasks and the rollout engine)."""

    def __init__(self, what: str, retry_s: tuple[float, float]) -> None:
        self._what = what
        self._start_s, self._cap_s = retry_s
        self.delay_s = 0.0
        self.failures = 0

    def failed(self, exc: StoreError) -> float:
        self.failures += 1
        if not self.delay_s:
            log.warning("%s: the store failed, retrying until it works: %s", self._what, exc)
        else:
            log.debug("%s: the store still fails: %s", self._what, exc)
        self.delay_s = min(max(self.delay_s * 2, self._start_s), self._cap_s)
        return self.delay_s

    def recovered(self) -> None:
        if self.delay_s:
            log.info("%s: the store works again (%d failures)", self._what, self.failures)
            self.delay_s = 0.0


class Dispatcher:
    def __init__(
        self,
        store: PlatformStore,
        settings: CommandSettings,
        *,
        clock: Callable[[], float] = time.time,
        retry_s: tuple[float, float] = (RETRY_START_S, RETRY_CAP_S),
    ) -> None:
        self._store = store
        self._settings = settings
        self._clock = clock
        self._publisher: Publisher | None = None
        self._wakeup = asyncio.Event()
        self._online: dict[DeviceName, None] = {}  # came online: their commands go out again
        self._replies: deque[tuple[DeviceName, bytes]] = deque()
        self._replies_ready = asyncio.Event()
        self._waiters: dict[str, list[asyncio.Future[Command]]] = {}
        self._waiting = 0
        self.on_final: list[Callable[[Command], None]] = []  # a command finished (the rollouts)
        self._dispatch_outage = StoreOutage("command dispatch", retry_s)
        self._reply_outage = StoreOutage("command replies", retry_s)
        self._expiry_outage = StoreOutage("command expiry", retry_s)
        self._publish_failing = False
        self._scan_wanted = True  # a send happened: look for queued commands of online devices
        self._scanned_at = 0.0
        self._rescan_at: float | None = None
        self.published = 0  # commands handed to the broker (repeats included)
        self.failed_publishes = 0
        self.finished = 0  # commands finished by a reply
        self.expired = 0
        self.ignored_replies = 0  # not an open command of the device that replied
        self.malformed_replies = 0
        self.dropped_replies = 0  # more than max_pending_replies waited for the store

    def bind(self, publisher: Publisher) -> None:
        """Publish through `publisher` (the platform's service client, made with the app)."""
        self._publisher = publisher
        self._wakeup.set()

    @property
    def store_failures(self) -> int:
        outages = (self._dispatch_outage, self._reply_outage, self._expiry_outage)
        return sum(outage.failures for outage in outages)

    # -- the public API ------------------------------------------------------------------------

    async def send(
        self,
        names: Sequence[DeviceName],
        action: str,
        args: dict[str, Any] | None = None,
        *,
        expires_in_s: float | None = None,
        actor: str,
    ) -> tuple[str, list[Command]]:
        """Queue `action` for every device of `names` (one batch, one command each, in order;
        a name given twice gets one). Raises ValueError for bad arguments (no devices, too many,
        an action that is not 1 to 64 characters, args that are not a JSON object of at most
        `max_args_bytes`, an expiry out of range) and NotFoundError naming the devices that are
        not active (then nothing is queued)."""
        settings = self._settings
        if not names:
            raise ValueError("no devices to send the command to")
        if len(names) > settings.max_devices:
            raise ValueError(f"at most {settings.max_devices} devices per command")
        if not isinstance(action, str) or not 1 <= len(action) <= MAX_ACTION_LENGTH:
            raise ValueError(f"action must be a string of 1 to {MAX_ACTION_LENGTH} characters")
        args = {} if args is None else args
        if not isinstance(args, dict):
            raise ValueError("args must be a JSON object")
        try:
            size = len(json.dumps(args, separators=(",", ":"), allow_nan=False).encode())
        except (TypeError, ValueError) as exc:
            raise ValueError(f"args must be plain JSON: {exc}") from exc
        if size > settings.max_args_bytes:
            raise ValueError(f"args take {size} bytes as JSON, more than {settings.max_args_bytes}")
        ttl_s = settings.default_ttl_s if expires_in_s is None else expires_in_s
        if isinstance(ttl_s, bool) or not 1 <= ttl_s <= settings.max_ttl_s:
            raise ValueError(f"expires_in_s must be from 1 to {settings.max_ttl_s:g}")
        batch_id = f"b-{secrets.token_hex(8)}"
        commands = await self._store.create_commands(
            names,
            action,
            args,
            expires_at=self._clock() + ttl_s,
            actor=actor,
            batch_id=batch_id,
        )
        self._scan_wanted = True
        self._rescan_at = self._clock() + RESCAN_AFTER_SEND_S
        log.info(
            "batch %s: %s queued for %d device(s) by %s", batch_id, action, len(commands), actor
        )
        self._wakeup.set()
        return batch_id, commands

    def commands_queued(self) -> None:
        """Commands were queued by someone else (the rollouts): look for them soon, as after a
        `send`."""
        self._scan_wanted = True
        self._rescan_at = self._clock() + RESCAN_AFTER_SEND_S
        self._wakeup.set()

    async def wait(self, command_id: str, timeout_s: float) -> Command:
        """The command once it is final (done, failed, expired), or as it is after `timeout_s`.
        NotFoundError for an unknown id; StoreError when the store fails."""
        command = await self._store.get_command(command_id)
        if command is None:
            raise NotFoundError(f"no command {command_id}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not command.final and (remaining := deadline - loop.time()) > 0:
            if self._waiting >= self._settings.max_waiters:
                log.info(
                    "command %s: %d callers wait already, not waiting", command_id, self._waiting
                )
                return command
            future: asyncio.Future[Command] = loop.create_future()
            self._waiters.setdefault(command_id, []).append(future)
            self._waiting += 1
            try:
                await asyncio.wait([future], timeout=min(remaining, WAIT_POLL_S))
            finally:
                self._waiting -= 1
                self._forget_waiter(command_id, future)
            if future.done() and not future.cancelled():
                command = future.result()
            else:  # finished by another process, or not at all
                command = await self._store.get_command(command_id) or command
        return command

    # -- hooks (called from presence: note and return) ------------------------------------------

    def device_online(self, name: DeviceName) -> None:
        self._online[name] = None
        self._wakeup.set()

    def reply_received(self, name: DeviceName, payload: bytes) -> None:
        if len(self._replies) >= self._settings.max_pending_replies:
            self.dropped_replies += 1
            return
        self._replies.append((name, payload))
        self._replies_ready.set()

    # -- publishing ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Publish due commands until cancelled (see the module docstring)."""
        delay_s = 0.0
        while True:
            if delay_s:
                await asyncio.sleep(delay_s)
            else:
                try:
                    async with asyncio.timeout(self._settings.poll_s):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass
            self._wakeup.clear()
            publisher = self._publisher
            if publisher is None or not publisher.connected.is_set():
                delay_s = 0.0
                continue  # the devices that came online wait in self._online
            try:
                more = await self.dispatch_once(publisher)
            except StoreError as exc:
                delay_s = self._dispatch_outage.failed(exc)
                continue
            self._dispatch_outage.recovered()
            delay_s = 0.0
            if more:
                self._wakeup.set()

    async def dispatch_once(self, publisher: Publisher) -> bool:
        """One round: publish and mark sent; True if there is more to do at once."""
        limit = self._settings.batch_size
        names = list(self._online)[:limit]
        for name in names:
            del self._online[name]
        now = self._clock()
        scan_s = min(SCAN_S, self._settings.resend_after_s / 2)
        rescan = self._rescan_at is not None and now >= self._rescan_at
        scan = self._scan_wanted or rescan or now - self._scanned_at >= scan_s
        try:
            due = await self._store.due_commands(names) if names else []
            fresh: list[Command] = []
            if scan:
                self._scan_wanted = False
                if rescan:
                    self._rescan_at = None
                fresh = await self._store.dispatchable_commands(
                    resend_before=now - self._settings.resend_after_s, limit=limit
                )
                self._scanned_at = now
        except StoreError:
            self._scan_wanted = self._scan_wanted or scan
            for name in names:
                self._online[name] = None
            raise
        commands = list({c.command_id: c for c in (*due, *fresh)}.values())
        if not commands:
            return bool(self._online)
        published = await self._publish(publisher, commands)
        if published:
            await self._store.mark_sent(published, now)
        if len(fresh) >= limit:
            self._scan_wanted = True  # a full batch: there may be more, scan again at once
        return bool(self._online) or self._scan_wanted

    async def _publish(self, publisher: Publisher, commands: list[Command]) -> list[str]:
        """Publish `commands`, at most `max_inflight` unacknowledged at once; the ids taken."""
        semaphore = asyncio.Semaphore(self._settings.max_inflight)

        async def publish(command: Command) -> str | None:
            topic = topics.device_topic(command.device, topics.CMD)
            payload = json.dumps(command.message(), separators=(",", ":")).encode()
            async with semaphore:
                try:
                    await publisher.publish(topic, payload)
                except BrokerUnavailable as exc:
                    self.failed_publishes += 1
                    if not self._publish_failing:
                        log.warning("commands not published, sent again later: %s", exc)
                    self._publish_failing = True
                    return None
            return command.command_id

        results = await asyncio.gather(*(publish(command) for command in commands))
        taken = [command_id for command_id in results if command_id is not None]
        if taken and self._publish_failing and len(taken) == len(commands):
            log.info("commands published again")
            self._publish_failing = False
        self.published += len(taken)
        log.debug("published %d of %d command(s)", len(taken), len(commands))
        return taken

    # -- replies -------------------------------------------------------------------------------

    async def run_replies(self) -> None:
        """Apply device replies in batches until cancelled; a batch the store refuses is kept
        and tried again (replies meanwhile wait within their bound)."""
        while True:
            await self._replies_ready.wait()
            if not self._replies:
                self._replies_ready.clear()
                continue
            raw = [
                self._replies.popleft()
                for _ in range(min(len(self._replies), self._settings.batch_size))
            ]
            replies = [reply for reply in map(self._parse_reply, raw) if reply is not None]
            while replies:
                try:
                    finished = await self._store.finish_commands(replies)
                except StoreError as exc:
                    await asyncio.sleep(self._reply_outage.failed(exc))
                    continue
                self._reply_outage.recovered()
                for reply, command in zip(replies, finished, strict=True):
                    if command is None:
                        self.ignored_replies += 1
                        log.debug(
                            "reply from %s for %s: not an open command of that device, ignored",
                            reply.name,
                            reply.command_id,
                        )
                    else:
                        self.finished += 1
                        log.debug(
                            "command %s on %s: %s", command.command_id, command.name, command.state
                        )
                        self._resolve(command)
                break

    def _parse_reply(self, raw: tuple[DeviceName, bytes]) -> CommandReply | None:
        name, payload = raw
        try:
            body = json.loads(payload)
        except (ValueError, RecursionError):
            body = None
        command_id = body.get("id") if isinstance(body, dict) else None
        if (
            not isinstance(body, dict)
            or not isinstance(command_id, str)
            or not isinstance(body.get("ok"), bool)
        ):
            self.malformed_replies += 1
            log.debug("reply from %s is not {id, ok, ...}: ignored", name)
            return None
        error = body.get("error")
        return CommandReply(
            name,
            command_id,
            ok=body["ok"],
            result=body.get("result"),
            error=None if error is None else str(error),
        )

    # -- expiry --------------------------------------------------------------------------------

    async def run_expiry(self) -> None:
        """Mark overdue commands expired, `batch_size` at a time, every `poll_s`."""
        while True:
            try:
                expired = await self._store.expire_commands(limit=self._settings.batch_size)
            except StoreError as exc:
                await asyncio.sleep(self._expiry_outage.failed(exc))
                continue
            self._expiry_outage.recovered()
            for command in expired:
                self.expired += 1
                self._resolve(command)
            if expired:
                log.info("%d command(s) expired", len(expired))
            if len(expired) < self._settings.batch_size:
                await asyncio.sleep(self._settings.poll_s)

    # -- waiters -------------------------------------------------------------------------------

    def _resolve(self, command: Command) -> None:
        for hook in self.on_final:
            hook(command)
        for future in self._waiters.pop(command.command_id, []):
            if not future.done():
                future.set_result(command)

    def _forget_waiter(self, command_id: str, future: asyncio.Future[Command]) -> None:
        futures = self._waiters.get(command_id)
        if futures is None:
            return
        if future in futures:
            futures.remove(future)
        if not futures:
            del self._waiters[command_id]
