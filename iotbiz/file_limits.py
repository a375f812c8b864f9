"""The platform's connection caps, fitted to the process's open-file limit (raised first).

Every HTTP and MQTT connection is a file descriptor. The caps in the settings (`http.max_*`,
`mqtt.max_*`) suit a box whose limit was raised (the systemd unit's `LimitNOFILE=65536`); under
a small limit (1024, a shell's default) they would let an attacker's sockets take every
descriptor, and then nothing, not even the store, could open a file. So at start the caps are
lowered to fit: `RESERVED` descriptors kept for the process itself, a quarter of the rest at most
for HTTP, the remainder for MQTT, and the sockets one address may hold before their CONNECT at
most an eighth of MQTT's. A warning says so when fewer than `FLEET` MQTT connections fit.
"""

from __future__ import annotations

import dataclasses
import logging
import resource

from iotbiz.settings import Settings

log = logging.getLogger(__name__)

RESERVED = 128
FLEET = 10_000  # devices one box is meant to carry


def fit_to_file_limit(settings: Settings, limit: int | None = None) -> Settings:
    """`settings` with the connection caps lowered to fit `limit` (default: the soft limit)."""
    if limit is None:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = soft if soft != resource.RLIM_INFINITY else 1 << 20
    budget = max(limit - RESERVED, 64)
    http, mqtt = settings.http, settings.mqtt
    http_total = min(http.max_connections, max(budget // 4, 16))
    mqtt_total = min(mqtt.max_connections, max(budget - http_total, 16))
    fitted_http = dataclasses.replace(
        http,
        max_connections=http_total,
        max_connections_per_address=min(http.max_connections_per_address, http_total),
    )
    fitted_mqtt = dataclasses.replace(
        mqtt,
        max_connections=mqtt_total,
        max_connections_per_address=min(mqtt.max_connections_per_address, mqtt_total),
        max_pending_per_address=min(mqtt.max_pending_per_address, max(mqtt_total // 8, 4)),
    )
    if (fitted_http, fitted_mqtt) != (http, mqtt):
        # a warning only when the fleet the platform is built for no longer fits
        level = logging.WARNING if mqtt_total < FLEET else logging.DEBUG
        log.log(
            level,
            "the open-file limit (%d) is below what the connection caps need: HTTP at most %d"
            " connections (%d per address), MQTT %d (%d per address, %d per address before"
            " CONNECT); raise LimitNOFILE to lift this",
            limit,
            fitted_http.max_connections,
            fitted_http.max_connections_per_address,
            fitted_mqtt.max_connections,
            fitted_mqtt.max_connections_per_address,
            fitted_mqtt.max_pending_per_address,
        )
    return dataclasses.replace(settings, http=fitted_http, mqtt=fitted_mqtt)


def raise_file_limit() -> int:
    """Raise the soft limit on open files to the hard one (systemd's default soft limit is
    1024, every device connection a descriptor) and return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target <= soft:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
        return soft
    log.info("open-file limit raised from %d to %d", soft, target)
    return target
