"""Customer ids, device ids and device names: the one place that says what is valid.

Ids end up in MQTT usernames and topics (`devices/{customer_id}/{device_id}/...`), so anything that
could break a topic ACL (`/`, `+`, `#`, spaces, NUL, non-ASCII...) is refused here.
"""

from __future__ import annotations

import re
from typing import NamedTuple

CUSTOMER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", re.ASCII)
# Operator account names never hold '/', so an account can never be mistaken for a device.
ACCOUNT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9:_-]{0,63}", re.ASCII)
# MAC notations: 44:8a:5b:9c:70:93, 44-8a-5b-9c-70-93, 448a5b9c7093 and Cisco's 448a.5b9c.7093.
_MAC_FORMS = (
    re.compile(r"([0-9A-Fa-f]{2})" + r"[:]([0-9A-Fa-f]{2})" * 5, re.ASCII),
    re.compile(r"([0-9A-Fa-f]{2})" + r"[-]([0-9A-Fa-f]{2})" * 5, re.ASCII),
    re.compile(r"([0-9A-Fa-f]{2})" * 6, re.ASCII),
    re.compile(
        r"([0-9A-Fa-f]{2})([0-9A-Fa-f]{2})\.([0-9A-Fa-f]{2})([0-9A-Fa-f]{2})"
        r"\.([0-9A-Fa-f]{2})([0-9A-Fa-f]{2})",
        re.ASCII,
    ),
)


class DeviceName(NamedTuple):
    customer_id: str
    device_id: str

    def __str__(self) -> str:
        return f"{self.customer_id}/{self.device_id}"


def is_customer_id(value: str) -> bool:
    return CUSTOMER_ID.fullmatch(value) is not None


def is_account_name(value: str) -> bool:
    return ACCOUNT_NAME.fullmatch(value) is not None


def normalize_device_id(value: str) -> str | None:
    """Return the canonical device id (MACs in lower-case colon form), or None if invalid."""
    for form in _MAC_FORMS:
        match = form.fullmatch(value)
        if match:
            return ":".join(match.groups()).lower()
    if DEVICE_ID.fullmatch(value):
        return value
    return None


def parse_device_name(value: str) -> DeviceName | None:
    """Parse `customer_id/device_id` (the device id in any accepted notation), or None."""
    customer_id, sep, device_id = value.partition("/")
    if not sep or not is_customer_id(customer_id):
        return None
    normalized = normalize_device_id(device_id)
    if normalized is None:
        return None
    return DeviceName(customer_id, normalized)
