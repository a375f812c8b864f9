"""Log filters of `HardenedBroker` (part of `iotbiz.broker.hardened`).

A throttle for log lines about counted events, the filter that drops amqtt's "Broker startup
failed" traceback while `HardenedBroker.start` runs, and the one that sums up amqtt's warnings
about connections that never sent a good CONNECT (installed on amqtt's logger at import).
"""

from __future__ import annotations

import logging
import time

__all__ = ["FAILED_CONNECTS", "FAILED_CONNECT_LOG_PERIOD_S", "StartupFailureFilter", "Throttle"]

log = logging.getLogger("iotbiz.broker.hardened")  # the logger name from before the split

FAILED_CONNECT_LOG_PERIOD_S = 10.0


class Throttle:
    """`ready()` is true at most once per `period` seconds (for log lines about counted events)."""

    __slots__ = ("_last", "_period")

    def __init__(self, period: float) -> None:
        self._period = period
        self._last = -period

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self._last < self._period:
            return False
        self._last = now
        return True


class StartupFailureFilter(logging.Filter):
    """Drops amqtt's "Broker startup failed" record (its exception is raised to the caller)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "Broker startup failed" and record.exc_info)


class _FailedConnectSummary(logging.Filter):
    """amqtt logs a WARNING for every connection that sent no CONNECT in time or a bad one: a
    pool of silent sockets, reopened as they time out, wrote lines without end. Those records
    are dropped and counted; one INFO line at most every FAILED_CONNECT_LOG_PERIOD_S sums them
    up (the latest's reason with it)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._logged = 0
        self._throttle = Throttle(FAILED_CONNECT_LOG_PERIOD_S)

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Failed to initialize client session"):
            return True
        self.count += 1
        if self._throttle.ready():
            log.info(
                "connections closed without a good CONNECT: %d since the last such line"
                " (the latest: %s)",
                self.count - self._logged,
                str(record.getMessage()).removeprefix("Failed to initialize client session: "),
            )
            self._logged = self.count
        return False


FAILED_CONNECTS = _FailedConnectSummary()
logging.getLogger("amqtt.broker").addFilter(FAILED_CONNECTS)
