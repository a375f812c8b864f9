"""sd_notify for `Type=notify` units: READY=1 once started, WATCHDOG=1 while the loop is alive."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from iotbiz.settings import systemd_notify_settings

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send `message` to systemd; False when not run by systemd (or the socket is gone)."""
    address, _ = systemd_notify_settings()
    if address is None:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)  # a backed-up notify socket must not block the event loop
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.debug("sd_notify %s failed: %s", message, exc)
        return False
    return True


def watchdog_interval_s() -> float:
    """systemd's watchdog interval (WatchdogSec), 0 when there is none."""
    return systemd_notify_settings()[1]


async def keep_watchdog_fed(healthy: Callable[[], bool]) -> None:
    """Ping systemd's watchdog at half its interval while `healthy()` (until cancelled). A stuck
    loop, or an agent whose essential tasks died, stops the pings and systemd restarts it."""
    interval_s = watchdog_interval_s()
    if interval_s <= 0:
        return
    while True:
        if healthy():
            notify("WATCHDOG=1")
        else:
            log.error("not healthy: the systemd watchdog is no longer fed")
        await asyncio.sleep(interval_s / 2)
