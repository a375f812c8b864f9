"""Who may connect to the broker and what each may do: the decisions behind the amqtt plugins.

Principals:
  - a device: username `{customer_id}/{device_id}` of an ACTIVE device, client id equal to the
    username; publishes only its own status/telemetry/events/reply, subscribes only its own cmd;
  - the platform's service account (created at start, in memory) and operator accounts without
    the superuser flag: the service role, i.e. subscribe/receive under `devices/`, publish any
    device's `cmd`; their client id holds no `/`, so it can never be a device's;
  - superuser accounts: any client id, any topic.

Verified credentials are cached (a SHA-256 of the password, in memory) so that reconnects do not
pay bcrypt again. Checking an uncached login runs bcrypt on the hasher the registrar uses; MQTT
logins may fill only `login_hash_share` (setting mqtt.login_hash_share) of its queue bound, so a
flood of wrong passwords cannot starve enrollment. Beyond that share a login waits its turn, in
arrival order, for as long as its expected wait (from the measured time per check) is within
`login_wait_s` (setting mqtt.login_wait_s, 25 s: inside the agent's 30 s CONNACK timeout, and
it is also the longest a login waits, whatever the estimate said);
a login that would wait longer is refused at once as `Refusal.UNAVAILABLE` (CONNACK 3, "server
unavailable": the credentials may be right; the agent backs off and retries), counted in
`busy_refusals` and logged at most once per `BUSY_LOG_PERIOD_S`. A cold reconnect storm is so
served at bcrypt's pace: refusing every login beyond the share at once (the rule until
2026-12-02) left bcrypt idle while the refused devices sat out their backoff, and 10,000 devices
took 73 s to connect instead of about 20.

An external broker's checks after the login (RabbitMQ's vhost/resource/topic, EMQX's authz)
carry no password; `principal_of` answers them for names verified here or, since the login may
have reached another platform process, for active devices and accounts read from the store
(cached beside the credentials, forgotten with them).

Failed logins are not cached: a negative entry would lock out a device that connects right after
it is activated (the change feed arrives up to a poll later), and a flood with a new password per
attempt would bypass it anyway; the share is the bound.

The cache forgets a name when the store's change feed (its audit log) says the device was revoked,
reset or registered again, or the account removed, whichever process made the change; the broker
then disconnects that name's sessions, and for a revoked or reset device also drops the retained
messages on its topics (a new subscriber must not see the status of a device that is gone).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from iotbiz import topics
from iotbiz.errors import IotbizError
from iotbiz.models import DeviceState
from iotbiz.names import DeviceName, parse_device_name
from iotbiz.passwords import PasswordHasher
from iotbiz.store.interface import PlatformStore

log = logging.getLogger(__name__)

# Audit actions after which a name's cached credentials and live sessions must go.
_REVOKING_ACTIONS = frozenset(
    {"device.revoke", "device.reset", "device.register_again", "account.remove"}
)
# ... and after which the device's retained messages must go too.
_RETAINED_DROPPING_ACTIONS = frozenset({"device.revoke", "device.reset"})
CHANGE_POLL_S = 0.25
COMMANDS_QUEUED = "command.send"  # the audit action of a queued command
LOGIN_HASH_SHARE = 0.5  # MQTT logins may fill this share of the bcrypt queue bound (default)
LOGIN_WAIT_S = 25.0  # the longest a login waits for its turn at bcrypt (default)
BUSY_LOG_PERIOD_S = 10.0
REFUSAL_LOG_PERIOD_S = 10.0


class Refusal(enum.Enum):
    """Why `Authority.authenticate` refused a login."""

    DENIED = "denied"  # bad credentials, not active, client id not allowed (CONNACK 5)
    UNAVAILABLE = "unavailable"  # bcrypt queue at its share, or the store failed (CONNACK 3)


class _HasherBusy(Exception):
    """MQTT logins already fill their share of the bcrypt queue."""


class Role(enum.StrEnum):
    DEVICE = "device"
    SERVICE = "service"
    SUPERUSER = "superuser"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated MQTT user and the topics it may use (precomputed for speed)."""

    username: str
    role: Role
    publish_topics: frozenset[str] = frozenset()
    command_topic: str = ""
    telemetry_topic: str = ""
    device: DeviceName | None = None  # set for a device


class Kick(Protocol):
    """Disconnect every session of `username`; with `drop_retained`, also remove the retained
    messages on that device's topics."""

    def __call__(self, username: str, *, drop_retained: bool) -> Awaitable[None]: ...


class Authority:
    def __init__(
        self,
        store: PlatformStore,
        hasher: PasswordHasher,
        *,
        service_username: str,
        service_password: str,
        login_hash_share: float = LOGIN_HASH_SHARE,
        login_wait_s: float = LOGIN_WAIT_S,
    ) -> None:
        self._store = store
        self._hasher = hasher
        # the embedded broker sets both from the mqtt settings
        self.login_hash_share = login_hash_share
        self.login_wait_s = login_wait_s
        self.service_username = service_username
        self._service_digest = _digest(service_password)
        self._verified: dict[str, tuple[bytes, Principal]] = {}
        self._known: dict[str, Principal] = {}  # principals read from the store, no password
        self._epoch = 0  # bumped whenever the cache forgets something
        self.denied_publishes = 0
        # called when another process (or this one) queued commands: the leader's dispatcher
        # looks at once instead of at its next scan
        self.on_commands_queued: list[Callable[[], None]] = []
        self.refused_logins = 0  # refused as DENIED
        self.busy_refusals = 0  # refused as UNAVAILABLE because bcrypt was at its share
        self._busy_logged_at = -BUSY_LOG_PERIOD_S
        self._refusal_logged_at = -REFUSAL_LOG_PERIOD_S
        self._refusals_logged = 0

    @property
    def hasher(self) -> PasswordHasher:
        return self._hasher

    # -- authentication ------------------------------------------------------------------------

    async def authenticate(
        self, username: str | None, password: str | None, client_id: str | None
    ) -> Principal | Refusal:
        """The principal for these credentials, or why they are refused. Never raises."""
        if not username or password is None or not client_id:
            return self._refuse(username, "no username, password or client id")
        try:
            principal = await self._authenticate(username, password)
        except _HasherBusy:
            return self._refuse_busy()
        except IotbizError as exc:
            log.warning("login of %s refused: store failure: %s", username, exc)
            return Refusal.UNAVAILABLE
        if principal is None:
            return self._refuse(username, "bad credentials or not active")
        if not client_id_allowed(principal, client_id):
            return self._refuse(username, f"client id {client_id!r} not allowed")
        return principal

    async def _authenticate(self, username: str, password: str) -> Principal | None:
        digest = _digest(password)
        if username == self.service_username:
            if hmac.compare_digest(digest, self._service_digest):
                return Principal(username, Role.SERVICE)
            return None
        cached = self._verified.get(username)
        if cached is not None:
            return cached[1] if hmac.compare_digest(digest, cached[0]) else None
        if self._hasher.would_refuse(self.login_hash_share, self.login_wait_s):
            raise _HasherBusy  # before the store read: a refused flood costs nothing
        epoch = self._epoch
        principal = await self._verify(username, password)
        if principal is None:
            return None
        if epoch != self._epoch:
            # The cache forgot something while bcrypt ran: check once more against the store.
            if await self._verify(username, password) is None:
                return None
        else:
            self._verified[username] = (digest, principal)
        return principal

    async def _verify(self, username: str, password: str) -> Principal | None:
        """Check the password against the store (bcrypt, off the event loop)."""
        name = parse_device_name(username)
        if name is not None and str(name) == username:
            device = await self._store.get_device(name)
            usable = device is not None and device.state is DeviceState.ACTIVE
            known_hash = device.password_hash if usable and device is not None else None
            await self._turn_at_hasher()
            # a decoy check when there is no hash: a refusal takes one bcrypt check's time
            # whether the device exists or not (no device-existence oracle)
            if not await self._hasher.check(password, known_hash):
                return None
            return device_principal(name)
        account = await self._store.get_account(username)
        await self._turn_at_hasher()
        known = account.password_hash if account is not None else None
        if not await self._hasher.check(password, known) or account is None:
            return None
        return Principal(username, Role.SUPERUSER if account.superuser else Role.SERVICE)

    async def _turn_at_hasher(self) -> None:
        """Wait for room in MQTT's share of the bcrypt queue (the check must follow at once)."""
        if not await self._hasher.admit(self.login_hash_share, self.login_wait_s):
            raise _HasherBusy

    def _refuse(self, username: str | None, reason: str) -> Refusal:
        """One refused login: counted, logged at DEBUG, and summed up in one INFO line at most
        every REFUSAL_LOG_PERIOD_S (a flood of bad logins must not flood the log)."""
        self.refused_logins += 1
        log.debug("MQTT login of %s refused: %s", username, reason)
        now = time.monotonic()
        if now - self._refusal_logged_at >= REFUSAL_LOG_PERIOD_S:
            unlogged = self.refused_logins - self._refusals_logged
            self._refusal_logged_at, self._refusals_logged = now, self.refused_logins
            log.info(
                "MQTT logins refused: %d since the last such line (the latest: %s, %s)",
                unlogged,
                username,
                reason,
            )
        return Refusal.DENIED

    def _refuse_busy(self) -> Refusal:
        self.busy_refusals += 1
        now = time.monotonic()
        if now - self._busy_logged_at >= BUSY_LOG_PERIOD_S:
            self._busy_logged_at = now
            log.warning(
                "MQTT logins refused with CONNACK 3: bcrypt queue at MQTT's share "
                "(%d refused so far; logged at most every %.0f s)",
                self.busy_refusals,
                BUSY_LOG_PERIOD_S,
            )
        return Refusal.UNAVAILABLE

    async def principal_of(self, username: str) -> Principal | None:
        """The principal behind an external broker's later checks (vhost, resource, topic,
        authz), which carry no password: the broker asks them only after a login it allowed.
        That login may have been verified by another platform process (several behind one
        load balancer), so a name this process has not verified is looked up in the store: an
        ACTIVE device, an operator account. Found names are cached and forgotten with the
        credential cache (a revoke forgets both). None (deny) for anyone else, and when the
        store fails (logged)."""
        if username == self.service_username:
            return Principal(username, Role.SERVICE)
        cached = self._verified.get(username)
        if cached is not None:
            return cached[1]
        known = self._known.get(username)
        if known is not None:
            return known
        epoch = self._epoch
        try:
            principal = await self._principal_from_store(username)
        except IotbizError as exc:
            log.warning("check of %s denied: store failure: %s", username, exc)
            return None
        if principal is not None and epoch == self._epoch:
            self._known[username] = principal  # not when something was forgotten meanwhile
        return principal

    async def _principal_from_store(self, username: str) -> Principal | None:
        name = parse_device_name(username)
        if name is not None and str(name) == username:
            device = await self._store.get_device(name)
            active = device is not None and device.state is DeviceState.ACTIVE
            return device_principal(name) if active else None
        account = await self._store.get_account(username)
        if account is None:
            return None
        return Principal(username, Role.SUPERUSER if account.superuser else Role.SERVICE)

    def forget(self, username: str) -> None:
        """Drop cached credentials and principal of `username` (after a revoke, reset, ...)."""
        self._epoch += 1
        self._verified.pop(username, None)
        self._known.pop(username, None)

    async def follow_changes(self, kick: Kick, *, poll_s: float = CHANGE_POLL_S) -> None:
        """Follow the store's change feed for ever: forget and disconnect revoked names (and
        drop the retained messages of revoked and reset devices).

        Runs as a task owned by the broker; changes made by the CLI in another process arrive
        within `poll_s`. Commands queued (by any process) call `on_commands_queued`.
        """
        cursor: int | None = None
        failing = False  # one warning per outage, not one per poll
        while True:
            try:
                if cursor is None:
                    cursor = await self._store.latest_change()
                    continue
                changes = await self._store.changes_since(cursor)
            except IotbizError as exc:
                if not failing:
                    log.warning("cannot read the store's changes (retrying): %s", exc)
                    failing = True
                changes = []
            else:
                if failing:
                    log.warning("the store's changes can be read again")
                    failing = False
            finally:
                await asyncio.sleep(poll_s)
            if any(change.action == COMMANDS_QUEUED for change in changes):
                for callback in self.on_commands_queued:
                    callback()
            revoking = [change for change in changes if change.action in _REVOKING_ACTIONS]
            if changes:
                cursor = changes[-1].entry_id
            # every name first: a slow kick (an external broker's management API, up to its
            # timeout) must not keep the next names' checks allowed meanwhile
            for change in revoking:
                self.forget(change.subject)
            for change in revoking:
                drop_retained = change.action in _RETAINED_DROPPING_ACTIONS
                await kick(change.subject, drop_retained=drop_retained)

    # -- authorisation -------------------------------------------------------------------------

    def may_publish(self, principal: Principal, topic: str) -> bool:
        if principal.role is Role.SUPERUSER:
            return True
        if principal.role is Role.DEVICE:
            allowed = topic in principal.publish_topics
        else:
            parsed = topics.parse_device_topic(topic)
            allowed = (
                parsed is not None
                and parsed[1] == topics.CMD
                and parse_device_name(str(parsed[0])) == parsed[0]
            )
        if not allowed:
            self.denied_publishes += 1
            log.info("%s may not publish to %r: dropped", principal.username, topic)
        return allowed

    def may_subscribe(self, principal: Principal, topic_filter: str) -> bool:
        if principal.role is Role.SUPERUSER:
            return True
        if principal.role is Role.DEVICE:
            return topic_filter == principal.command_topic
        return topic_filter.startswith(f"{topics.ROOT}/") or topic_filter == topics.ROOT

    def may_receive(self, principal: Principal, topic: str) -> bool:
        if principal.role is Role.SUPERUSER:
            return True
        if principal.role is Role.DEVICE:
            return topic == principal.command_topic
        return topic.startswith(f"{topics.ROOT}/")


def device_principal(name: DeviceName) -> Principal:
    return Principal(
        str(name),
        Role.DEVICE,
        publish_topics=frozenset(topics.device_topic(name, s) for s in topics.DEVICE_PUBLISHES),
        command_topic=topics.device_topic(name, topics.CMD),
        telemetry_topic=topics.device_topic(name, topics.TELEMETRY),
        device=name,
    )


def client_id_allowed(principal: Principal, client_id: str) -> bool:
    if principal.role is Role.SUPERUSER:
        return True
    if principal.role is Role.DEVICE:
        return client_id == principal.username  # no device can take over another's session
    return "/" not in client_id  # accounts can never use a device's client id


def _digest(password: str) -> bytes:
    return hashlib.sha256(password.encode()).digest()
