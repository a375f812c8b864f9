"""The platform process: the embedded MQTT broker and the registrar around one store.

Start order: store -> broker (devices can connect) -> registrar with its service MQTT client ->
HTTP. Stop order is the reverse, so nothing is used after it is closed.

External-broker mode (`broker.mode = "external"`, `--broker external`): no embedded broker. The
service client connects to `broker.url` as `SERVICE_USERNAME` with `broker.service_password`
(the same in every platform process, since the broker's auth callbacks may reach any of them)
and follows telemetry too; presence comes from what the devices send (`status`, the agent's
will, and any live message, see `iotbiz.presence`), as there are no broker connect/disconnect
events. The broker asks the
registrar's `/api/v1/broker-auth/...` callbacks, so the service client can log in only once HTTP
listens: the registrar does not wait for it at start, and /healthz answers 503 until it is
connected. Revoked names are disconnected through RabbitMQ's management API when
`broker.management_url` is set (`iotbiz.broker.management`).

Every long-lived task is owned here. The store change follower, the registrar's service
client and the leader run in every process, started by `Platform._spawn`; the work that must
run once per fleet (the presence writer, the command dispatcher's three tasks, the retention
pass and the rollouts) runs only in the process holding the store's leader lock
(`iotbiz.leader`: one of several processes sharing a PostgreSQL store; alone, at once):

    task RUNNING -> STOPPED    cancelled by `stop()`: the normal end
    task RUNNING -> FAILED     raised, returned, or was cancelled by someone else: logged (with
                               the traceback), and `Platform.failed` is set

Becoming the leader marks every device offline and subscribes the service client to the
devices' topics: with the embedded broker a device's connect says it is online, with an
external one (which keeps its devices connected while platform processes come and go, and
replays no retained status to a wildcard subscription: RabbitMQ 3.x) the next message it sends.
Offline until shown online: never online on a word nobody can check. Only the leader flushes
presence and marks the devices offline when it stops, then releases the lock. Commands queued
through any process reach the leader's dispatcher through the store's change feed
(`Authority.on_commands_queued`), within its poll.

`serve()` waits for SIGTERM/SIGINT or `failed`, whichever comes first, then stops everything; after
a failure it raises PlatformFailed, so the process exits 1 and systemd restarts it. `stop()` always
runs every step (HTTP, tasks, broker, presence flush, store, hasher): a step that raises is logged
and the next one runs, so the broker stops and the store closes whatever else went wrong.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import secrets
import signal
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import web

from iotbiz.broker.authority import Authority
from iotbiz.broker.embedded import EmbeddedBroker
from iotbiz.broker.management import external_kick
from iotbiz.dispatch import Dispatcher
from iotbiz.errors import BrokerUnavailable, ConfigError, PlatformFailed
from iotbiz.file_limits import fit_to_file_limit, raise_file_limit
from iotbiz.leader import Leader
from iotbiz.passwords import PasswordHasher
from iotbiz.presence import PresenceRecorder
from iotbiz.registrar import create_app, http_server
from iotbiz.registrar.keys import HEALTH_CHECKS, ROLLOUTS, SERVICE_CLIENT, HealthCheck
from iotbiz.registrar.service_client import ServiceClient, ServiceLink
from iotbiz.retention import Retention
from iotbiz.rollouts import RolloutEngine
from iotbiz.settings import BrokerEndpoint, Settings, broker_endpoint
from iotbiz.store.interface import PlatformStore
from iotbiz.store.opening import open_store
from iotbiz.tls import ServerTLS

log = logging.getLogger(__name__)

# The platform's own MQTT account; account names never contain '/', device names always do.
SERVICE_USERNAME = "iotbiz-platform"
# How long `stop()` waits for cancelled tasks, and the broker, before it goes on without them.
TASK_STOP_TIMEOUT_S = 5.0
BROKER_STOP_TIMEOUT_S = 10.0


class Platform:
    """Everything `python -m iotbiz.broker` runs, started and stopped as one."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store: PlatformStore | None = None
        self._hasher: PasswordHasher | None = None
        self._presence: PresenceRecorder | None = None
        self._dispatcher: Dispatcher | None = None
        self.authority: Authority | None = None
        self.broker: EmbeddedBroker | None = None
        self.external: BrokerEndpoint | None = None  # set in external-broker mode
        self._runner: web.AppRunner | None = None
        self.tls: ServerTLS | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.leader: Leader | None = None  # runs presence, dispatch, retention and rollouts
        self._stopping = False
        self.failed = asyncio.Event()  # a long-lived task died: the process must stop, exit 1
        self.failures: list[str] = []  # what died, for the exit message

    @property
    def store(self) -> PlatformStore:
        if self._store is None:
            raise RuntimeError("platform not started")
        return self._store

    @property
    def dispatcher(self) -> Dispatcher:
        """The command dispatcher: `send` and `wait` for the admin API and the CLI."""
        if self._dispatcher is None:
            raise RuntimeError("platform not started")
        return self._dispatcher

    @property
    def http_port(self) -> int:
        """The registrar's real port (useful when the setting is 0)."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("platform not started")
        return int(self._runner.addresses[0][1])

    @property
    def mqtt_port(self) -> int:
        """The embedded broker's real port; in external mode, the external broker's."""
        if self.external is not None:
            return self.external.port
        if self.broker is None:
            raise RuntimeError("platform not started")
        return self.broker.port

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        settings = self.settings = fit_to_file_limit(self.settings)
        external = settings.broker.mode == "external"
        if external and not settings.broker.service_password:
            raise ConfigError(
                "broker.service_password: required with broker.mode = external (the same in"
                " every platform process; e.g. IOTBIZ_BROKER_SERVICE_PASSWORD)"
            )
        if settings.tls.cert_file:  # first: a bad key or certificate stops nothing half-started
            self.tls = ServerTLS(settings.tls.cert_file, settings.tls.key_file)
        store = self._store = await open_store(settings.store)
        registrar = settings.registrar
        hasher = self._hasher = PasswordHasher(
            registrar.bcrypt_cost,
            threads=registrar.hash_threads,
            max_queued=registrar.max_queued_hashes,
        )
        presence = self._presence = PresenceRecorder(
            store, history=settings.history, external_broker=external
        )
        dispatcher = self._dispatcher = Dispatcher(store, settings.commands)
        presence.on_online.append(dispatcher.device_online)
        presence.on_reply.append(dispatcher.reply_received)
        if external:
            service_password = settings.broker.service_password
        else:
            service_password = secrets.token_urlsafe(32)
        self.authority = Authority(
            store,
            hasher,
            service_username=SERVICE_USERNAME,
            service_password=service_password,
            login_hash_share=settings.mqtt.login_hash_share,
            login_wait_s=settings.mqtt.login_wait_s,
        )
        if external:
            endpoint = self.external = broker_endpoint(settings.broker.url)
            kick = external_kick(settings.broker)
            self._spawn(self.authority.follow_changes(kick), "store-changes")
            service = ServiceLink(
                endpoint.host,
                endpoint.port,
                SERVICE_USERNAME,
                service_password,
                follow_telemetry=True,  # nobody else hands telemetry to presence
                client_id=f"{SERVICE_USERNAME}-{secrets.token_hex(4)}",  # one per process
                tls_context=_external_context(settings.broker.ca_file) if endpoint.tls else None,
            )
            log.info("external MQTT broker at %s (no embedded broker)", settings.broker.url)
        else:
            self.broker = EmbeddedBroker(
                settings.mqtt,
                self.authority,
                presence,
                tls_context=self.tls.context if self.tls is not None else None,
            )
            await self.broker.start()
            self._spawn(self.authority.follow_changes(self.broker.kick), "store-changes")
            service = ServiceLink(
                _connect_host(settings.mqtt.host),
                self.broker.port,
                SERVICE_USERNAME,
                service_password,
                follow_telemetry=False,  # the embedded broker hands telemetry to presence
                tls_context=None if self.broker.plain else _own_listener_context(),
            )
        app = create_app(
            settings,
            store,
            hasher=hasher,
            service=service,
            presence=presence,
            authority=self.authority,
            broker=self.broker,
            dispatcher=dispatcher,
            spawn=self._spawn,
            # the external broker asks this registrar about the service client's login: it
            # cannot connect before HTTP listens
            wait_for_service=not external,
        )
        if self.broker is not None:
            app[HEALTH_CHECKS].append(self.broker.health)
        else:
            app[HEALTH_CHECKS].append(_external_health(app[SERVICE_CLIENT], settings.broker.url))
        rollouts = app[ROLLOUTS] = RolloutEngine(
            store, settings.rollouts, commands_queued=dispatcher.commands_queued
        )
        dispatcher.on_final.append(rollouts.command_finished)
        service_client = app[SERVICE_CLIENT]
        dispatcher.bind(service_client)
        retention = Retention(store, settings.history)

        self.authority.on_commands_queued.append(dispatcher.commands_queued)
        timeout_s = settings.broker.presence_timeout_s  # external broker: silent means offline

        async def leadership_changed(leading: bool) -> None:
            if leading:  # presence starts over: offline until a device shows itself
                await store.mark_all_offline()
                presence.forget_online()
            await service_client.follow(leading)

        self.leader = Leader(
            store.leader_lock(),
            {
                "presence": presence.run,
                "dispatch": dispatcher.run,
                "command-replies": dispatcher.run_replies,
                "command-expiry": dispatcher.run_expiry,
                "retention": retention.run,
                "rollouts": rollouts.run,
                **(
                    {"presence-timeout": lambda: presence.run_silence_timeout(timeout_s)}
                    if external
                    else {}
                ),
            },
            on_failure=self._leader_task_failed,
            on_change=leadership_changed,
        )
        await service_client.follow(False)  # not connected yet: the leader's to turn on
        await self.leader.step()  # alone (or first), it leads from here on
        self._spawn(self.leader.run(), "leader")
        self._runner = http_server.runner(app, settings, handle_signals=False, shutdown_timeout=5.0)
        await self._runner.setup()
        http = settings.http
        context = self.tls.context if self.tls is not None else None
        site = web.TCPSite(
            self._runner,
            http.host,
            http.port,
            reuse_address=True,
            ssl_context=context,
            backlog=http.backlog,
        )
        try:
            await site.start()
        except OSError as exc:
            raise _listen_error("HTTP", http.host, http.port, "--http-port", exc) from exc
        scheme = "http" if context is None else "https"
        log.info("registrar listening on %s://%s:%d", scheme, http.host, self.http_port)

    def reload_tls(self) -> None:
        """SIGHUP: load the certificate and key again (new connections get them; connected
        devices stay)."""
        if self.tls is None:
            log.info("SIGHUP: TLS is off, nothing to reload")
            return
        self.tls.reload()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Start a long-lived task owned by the platform: `stop()` cancels it, and its death
        before that sets `failed`."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)
        return task

    def _leader_task_failed(self, name: str, reason: str) -> None:
        self.failures.append(f"task {name} died ({reason})")
        self.failed.set()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() and self._stopping:
            log.debug("task %s: RUNNING -> STOPPED", task.get_name())
            return
        if task.cancelled():
            reason = "cancelled"
            log.error("task %s: RUNNING -> FAILED (%s)", task.get_name(), reason)
        elif (exc := task.exception()) is not None:
            reason = f"{type(exc).__name__}: {exc}"
            log.error("task %s: RUNNING -> FAILED (%s)", task.get_name(), reason, exc_info=exc)
        else:
            reason = "returned"  # these tasks run until cancelled
            log.error("task %s: RUNNING -> FAILED (%s)", task.get_name(), reason)
        self.failures.append(f"task {task.get_name()} died ({reason})")
        self.failed.set()

    async def stop(self) -> list[str]:
        """Stop everything that was started, in reverse order, each step whatever the previous
        ones raised; return what went wrong (already logged), empty after a clean stop."""
        self._stopping = True
        problems: list[str] = []

        async def step(what: str, action: Callable[[], Awaitable[object] | None]) -> None:
            try:
                result = action()
                if result is not None:
                    await result
            except Exception as exc:
                log.exception("stopping: %s failed", what)
                problems.append(f"{what} failed ({type(exc).__name__}: {exc})")

        if self._runner is not None:
            runner, self._runner = self._runner, None
            await step("HTTP shutdown", runner.cleanup)  # stops the service client first
        await step("stopping tasks", self._stop_tasks)
        if self.broker is not None:
            broker, self.broker = self.broker, None
            await step("broker shutdown", lambda: _bounded(broker.stop(), BROKER_STOP_TIMEOUT_S))
        leader, self.leader = self.leader, None
        leading = leader is not None and leader.leading
        if self._presence is not None:
            presence, self._presence = self._presence, None
            if leading:  # a follower's presence is not the fleet's: it writes none
                await step("presence flush", lambda: presence.flush(final=True))
        if self._store is not None:
            store, self._store = self._store, None
            if leading:
                await step("marking devices offline", store.mark_all_offline)
            if leader is not None:
                await step("releasing the leader lock", leader.release)
            await step("closing the store", store.close)
        if self._hasher is not None:
            hasher, self._hasher = self._hasher, None
            await step("stopping the password hasher", hasher.close)
        return problems

    async def _stop_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=TASK_STOP_TIMEOUT_S)
        if pending:
            names = ", ".join(sorted(task.get_name() for task in pending))
            raise TimeoutError(f"tasks still running {TASK_STOP_TIMEOUT_S} s after cancel: {names}")


async def _bounded(action: Awaitable[None], timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        await action


def _external_context(ca_file: str) -> ssl.SSLContext:
    """TLS to the external broker: verified against `broker.ca_file` (else the system's trust
    store), host name included."""
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"broker.ca_file: cannot load {ca_file}: {reason}") from exc


def _external_health(client: ServiceClient, url: str) -> HealthCheck:
    """/healthz's broker part in external mode: the service client is connected to it."""

    async def check() -> tuple[str, str]:
        if not client.connected.is_set():
            raise BrokerUnavailable(f"not connected to the external MQTT broker {url}")
        return "broker", "connected"

    return check


def _connect_host(listen_host: str) -> str:
    """Where a local client reaches a listener bound to `listen_host`."""
    return "127.0.0.1" if listen_host in ("0.0.0.0", "", "::") else listen_host  # noqa: S104


def _listen_error(what: str, host: str, port: int, flag: str, exc: OSError) -> ConfigError:
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(f"{what} port {port} on {host} is in use; choose another with {flag}")
    return ConfigError(f"cannot listen for {what} on {host}:{port} ({exc.strerror}); see {flag}")


# A reconnect storm allocates fast, and amqtt leaves every finished connection in reference
# cycles. With Python's default thresholds (700, 10, 10), three 2,000-device storms set off 16
# full collections, each 0.1 to 0.3 s of a stopped event loop that freed almost nothing; the warm
# storms took 0.90 to 2.22 s. With generation 0 at 20,000, one full collection happened and the
# warm storms took 0.58 to 0.92 s. (Two runs with the defaults, three with 20,000.)
GC_THRESHOLDS = (20_000, 10, 10)


def run_platform(settings: Settings) -> None:
    """The platform's process: `serve` on uvloop (a faster event loop: the broker's per-message
    work is mostly event-loop overhead), or on asyncio's own loop where uvloop is not installed."""
    gc.set_threshold(*GC_THRESHOLDS)
    raise_file_limit()
    try:
        import uvloop  # not installed on Windows
    except ImportError:
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))


async def serve(settings: Settings) -> None:
    """Run the platform until SIGTERM or SIGINT, then shut it down cleanly; or until one of its
    long-lived tasks dies, then shut it down and raise PlatformFailed (exit code 1)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    platform = Platform(settings)
    loop.add_signal_handler(signal.SIGHUP, platform.reload_tls)
    problems: list[str] = []
    try:
        await platform.start()
        await _first_set(stop, platform.failed)
        if platform.failed.is_set():
            log.error("platform: RUNNING -> STOPPING (%s)", "; ".join(platform.failures))
        else:
            log.info("shutting down")
    finally:
        problems = await platform.stop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    failures = [*platform.failures, *problems]
    if failures:
        log.error("platform: STOPPING -> STOPPED (exit 1)")
        raise PlatformFailed("; ".join(failures))
    log.info("stopped")


def _own_listener_context() -> ssl.SSLContext:
    """TLS for the service client's connection to the platform's own TLS listener (when there
    is no plain one), on this machine: encrypted, but not verified, because the certificate
    names the platform's public host name, not the local address the client dials."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # its own listener, see the docstring
    return context


async def _first_set(*events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
