"""MQTT topic names, defined once (DESIGN.md, "MQTT contract").

Every device has the prefix `devices/{customer_id}/{device_id}/`; the suffixes below are the only
topics it may use. Ids are validated by `iotbiz.names`, so they never hold `/`, `+` or `#`.
"""

from __future__ import annotations

from iotbiz.names import DeviceName

ROOT = "devices"
STATUS = "status"
TELEMETRY = "telemetry"
EVENTS = "events"
REPLY = "reply"
CMD = "cmd"

DEVICE_PUBLISHES = frozenset({STATUS, TELEMETRY, EVENTS, REPLY})
DEVICE_SUBSCRIBES = frozenset({CMD})
ALL_DEVICES = f"{ROOT}/#"


def device_topic(name: DeviceName, suffix: str) -> str:
    return f"{ROOT}/{name.customer_id}/{name.device_id}/{suffix}"


def all_devices(suffix: str) -> str:
    """The filter matching `suffix` of every device, e.g. `devices/+/+/status`."""
    return f"{ROOT}/+/+/{suffix}"


def parse_device_topic(topic: str) -> tuple[DeviceName, str] | None:
    """`devices/{customer}/{device}/{suffix}` -> (name, suffix); None for anything else."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != ROOT or not all(parts[1:]):
        return None
    return DeviceName(parts[1], parts[2]), parts[3]
