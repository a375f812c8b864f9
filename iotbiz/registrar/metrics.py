"""Prometheus metrics of the platform, served at /metrics in the text format.

Each app has its own `CollectorRegistry` (not prometheus_client's global one), so that tests can
run several apps in one process. What is counted where:

- HTTP requests by method, route and status (`http_middleware`, outside the error middleware so
  that it sees the final status); the route label is the route's canonical path
  (`/api/v1/admin/devices/{customer_id}/{device_id}`), never the raw path, and the method one of
  a fixed set: label sets stay bounded whatever clients send. Enrollments (register, activate)
  by outcome come from the same middleware.
- The fleet (devices by state, online devices, commands by state) from the store, read by one
  call at most every `STORE_CACHE_S` whatever the scrape rate (`StoreCounts`): a scrape storm
  cannot load the store. A store that fails keeps the last values and sets `iotbiz_store_up 0`.
- MQTT connections, refused logins, denied publishes, logins refused while bcrypt was busy, and
  the broker's dropped messages: read at scrape time from the broker and its Authority, whose
  plain counters stay as they are (`MQTTCollector`).
- The command dispatcher's counters (published, finished, expired, ignored replies...), read at
  scrape time (`CommandCollector`).
- The event loop's lag: a task (`run_lag_probe`, owned by the app's cleanup_ctx) sleeps
  `LAG_PROBE_INTERVAL_S` and measures how late it wakes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from iotbiz.broker.authority import Authority
from iotbiz.broker.embedded import EmbeddedBroker
from iotbiz.errors import StoreError
from iotbiz.models import CommandState, DeviceState
from iotbiz.store.interface import PlatformStore

log = logging.getLogger(__name__)

STORE_CACHE_S = 5.0
LAG_PROBE_INTERVAL_S = 0.5
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
ENROLLMENT_ROUTES = {"/api/v1/register": "register", "/api/v1/activate": "activate"}
UNMATCHED = "unmatched"  # requests that matched no route (404, 405) share one label


@dataclass(frozen=True, slots=True)
class FleetCounts:
    devices: dict[str, int] = field(default_factory=dict)
    online: int = 0
    commands: dict[str, int] = field(default_factory=dict)


async def count_fleet(store: PlatformStore) -> FleetCounts:
    """Devices by state and online devices, from the store's fleet totals; commands by state."""
    devices = {}
    for state in DeviceState:
        _, devices[state.value] = await store.find_devices(state=state, limit=1)
    _, online = await store.find_devices(online=True, limit=1)
    commands = {state.value: count for state, count in (await store.count_commands()).items()}
    return FleetCounts(devices=devices, online=online, commands=commands)


class StoreCounts(Collector):
    """The fleet's numbers, read from the store at most every `ttl_s`; concurrent scrapes
    share one read."""

    def __init__(
        self,
        read: Callable[[], Awaitable[FleetCounts]],
        *,
        ttl_s: float = STORE_CACHE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self._counts = FleetCounts()
        self._read_at: float | None = None
        self._up = False
        self.reads = 0  # store reads made (for tests: scrapes do not multiply them)

    async def refresh(self) -> None:
        async with self._lock:
            now = self._clock()
            if self._read_at is not None and now - self._read_at < self._ttl_s:
                return
            self._read_at = now
            self.reads += 1
            try:
                self._counts = await self._read()
            except StoreError as exc:
                if self._up:
                    log.warning("metrics: cannot read the fleet counts: %s", exc)
                self._up = False
            else:
                self._up = True

    def collect(self) -> Iterator[Metric]:
        counts = self._counts
        up = GaugeMetricFamily("iotbiz_store_up", "1 if the last read of the store worked")
        up.add_metric([], 1 if self._up else 0)
        yield up
        devices = GaugeMetricFamily("iotbiz_devices", "devices by state", labels=["state"])
        for state in DeviceState:
            devices.add_metric([state.value], counts.devices.get(state.value, 0))
        yield devices
        online = GaugeMetricFamily("iotbiz_devices_online", "devices connected to the broker")
        online.add_metric([], counts.online)
        yield online
        if counts.commands:
            commands = GaugeMetricFamily("iotbiz_commands", "commands by state", labels=["state"])
            for command_state in CommandState:
                commands.add_metric(
                    [command_state.value], counts.commands.get(command_state.value, 0)
                )
            yield commands


class MQTTCollector(Collector):
    """The broker's connections and its Authority's refusal counters, read at scrape time."""

    def __init__(self, authority: Authority | None, broker: EmbeddedBroker | None) -> None:
        self._authority = authority
        self._broker = broker

    def collect(self) -> Iterator[Metric]:
        if self._broker is not None:
            broker = self._broker.broker
            connections = GaugeMetricFamily(
                "iotbiz_mqtt_connections", "MQTT connections (clients connected)"
            )
            connections.add_metric([], len(broker.connected_client_ids()))
            yield connections
            yield _counter(
                "iotbiz_mqtt_dropped_queued_messages",
                "oldest messages dropped from full offline queues",
                broker.dropped_queued_messages,
            )
            yield _counter(
                "iotbiz_mqtt_dropped_deliveries",
                "messages not sent to a connected client that fell behind",
                broker.dropped_deliveries,
            )
        if self._authority is not None:
            authority = self._authority
            yield _counter(
                "iotbiz_mqtt_refused_logins", "MQTT logins refused", authority.refused_logins
            )
            yield _counter(
                "iotbiz_mqtt_busy_refusals",
                "MQTT logins refused because password checks were at their share and the wait "
                "for a turn would exceed mqtt.login_wait_s",
                authority.busy_refusals,
            )
            waiting = GaugeMetricFamily(
                "iotbiz_mqtt_logins_waiting", "MQTT logins waiting for their turn at bcrypt"
            )
            waiting.add_metric([], authority.hasher.waiting)
            yield waiting
            yield _counter(
                "iotbiz_mqtt_denied_publishes",
                "publishes denied by the topic ACL",
                authority.denied_publishes,
            )


class CommandCounters(Protocol):
    """The dispatcher's plain counters (`iotbiz.dispatch.Dispatcher`)."""

    published: int
    failed_publishes: int
    finished: int
    expired: int
    ignored_replies: int
    malformed_replies: int
    dropped_replies: int


COMMAND_COUNTERS = {
    "published": "command messages handed to the broker (repeats included)",
    "failed_publishes": "command publishes the broker did not take",
    "finished": "commands finished by their device's reply",
    "expired": "commands expired without a reply",
    "ignored_replies": "replies that were not an open command of the device that sent them",
    "malformed_replies": "replies that were not a reply object",
    "dropped_replies": "replies dropped while too many waited for the store",
}


class CommandCollector(Collector):
    """The dispatcher's counters, read at scrape time."""

    def __init__(self, counters: CommandCounters) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        for attribute, documentation in COMMAND_COUNTERS.items():
            value = getattr(self._counters, attribute)
            yield _counter(f"iotbiz_commands_{attribute}", documentation, value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    counter = CounterMetricFamily(name, documentation)
    counter.add_metric([], value)
    return counter


class Metrics:
    """The registry of one app and the metrics its middleware and tasks update."""

    def __init__(self, store_counts: StoreCounts) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.store_counts = store_counts
        self.registry.register(store_counts)
        self.http_requests = Counter(
            "iotbiz_http_requests",
            "HTTP requests by method, route (its canonical path) and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "iotbiz_http_request_duration_seconds",
            "time to answer HTTP requests, by route",
            ["route"],
            registry=self.registry,
        )
        self.enrollments = Counter(
            "iotbiz_enrollments",
            "device API register and activate requests by outcome"
            " (ok, refused, busy, bad_request, unavailable, error)",
            ["step", "outcome"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "iotbiz_refusals",
            "requests refused, by step (register, activate, rate_limit, admin_auth) and reason",
            ["step", "reason"],
            registry=self.registry,
        )
        self.loop_lag = Gauge(
            "iotbiz_event_loop_lag_seconds",
            "how late the event loop last woke a sleeping task",
            registry=self.registry,
        )
        self.loop_lag_max = Gauge(
            "iotbiz_event_loop_lag_max_seconds",
            "the largest event loop lag since the last scrape",
            registry=self.registry,
        )
        self._lag_max = 0.0

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def note_lag(self, lag_s: float) -> None:
        self.loop_lag.set(lag_s)
        self._lag_max = max(self._lag_max, lag_s)

    async def render(self) -> bytes:
        await self.store_counts.refresh()
        self.loop_lag_max.set(self._lag_max)
        self._lag_max = 0.0
        return generate_latest(self.registry)

    def note_request(self, request: web.Request, status: int, duration_s: float) -> None:
        resource = request.match_info.route.resource
        route = UNMATCHED if resource is None else resource.canonical
        method = request.method if request.method in METHODS else "other"
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_duration.labels(route).observe(duration_s)
        step = ENROLLMENT_ROUTES.get(route)
        if step is not None and method == "POST":
            self.enrollments.labels(step, _outcome(status)).inc()


def _outcome(status: int) -> str:
    if status < 300:
        return "ok"
    return {403: "refused", 429: "busy", 400: "bad_request", 413: "bad_request"}.get(
        status, "unavailable" if status == 503 else "error"
    )


def http_middleware(metrics: Metrics) -> Middleware:
    """Counts every request by method, route and final status (the outermost middleware)."""

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # redirects and the like, re-raised by the errors one
            metrics.note_request(request, exc.status, time.perf_counter() - started)
            raise
        metrics.note_request(request, response.status, time.perf_counter() - started)
        return response

    return count


async def run_lag_probe(metrics: Metrics, interval_s: float = LAG_PROBE_INTERVAL_S) -> None:
    """Sleep `interval_s` again and again; how much later than asked each wake comes is the
    event loop's lag (time other callbacks held the loop)."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(interval_s)
        metrics.note_lag(max(0.0, loop.time() - started - interval_s))


def metrics_handler(metrics: Metrics) -> Handler:
    """GET /metrics: the Prometheus text format."""

    async def serve_metrics(request: web.Request) -> web.StreamResponse:
        body = await metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return serve_metrics
