"""Test-only amqtt 0.12.1 plugins: fixed users, a prefix ACL and an event recorder.

Users: `alice`, `bob`, `carol` and `root` (passwords in `PASSWORDS`); a client must use its
username as client id. ACL: `alice` and `carol` may publish and receive only under `a/`, `bob`
only under `b/`, `root` anything. Subscribing is allowed to filters under the own prefix and to
filters whose first level is `+` (e.g. `+/status`); what such a filter may deliver is decided per
message by the RECEIVE check, the way a real deployment lets devices use wildcards without
leaking other users' topics.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BasePlugin, BaseTopicPlugin
from amqtt.session import Session

PASSWORDS = {
    "alice": "alice-secret",
    "bob": "bob-secret",
    "carol": "carol-secret",
    "root": "root-secret",
}
PREFIXES = {"alice": "a", "bob": "b", "carol": "a"}
SUPERUSER = "root"

# (event, client id) for every CLIENT_CONNECTED / CLIENT_DISCONNECTED, in order.
EVENTS: list[tuple[str, str]] = []


class FixedUsersAuthPlugin(BaseAuthPlugin):
    """Accepts a CONNECT only with a known username, its password, and client id == username."""

    @dataclass
    class Config:
        users: dict[str, str] = field(default_factory=lambda: dict(PASSWORDS))

    async def authenticate(self, *, session: Session) -> bool:
        users: dict[str, str] = self.context.config.users
        username = session.username
        password = session.password
        if username is None or password is None or username not in users:
            return False
        if session.client_id != username:
            return False
        return hmac.compare_digest(password.encode(), users[username].encode())


class PrefixTopicPlugin(BaseTopicPlugin):
    """Per-user topic prefix ACL (see the module docstring). Unknown users may do nothing."""

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        if session is None or not topic or action is None:
            return False
        if session.username == SUPERUSER:
            return True
        prefix = PREFIXES.get(session.username or "")
        if prefix is None:
            return False
        first_level = topic.split("/", 1)[0]
        if action == Action.SUBSCRIBE:
            return first_level in (prefix, "+")
        return first_level == prefix


class EventRecorderPlugin(BasePlugin[Any]):
    """Records connect/disconnect events (the presence hooks) into `EVENTS`."""

    async def on_broker_client_connected(self, *, client_id: str, client_session: Session) -> None:
        EVENTS.append(("connected", client_id))

    async def on_broker_client_disconnected(
        self, *, client_id: str, client_session: Session
    ) -> None:
        EVENTS.append(("disconnected", client_id))


def broker_config() -> dict[str, Any]:
    """amqtt 0.12.1 config: one TCP listener on a free port, these plugins, nothing else."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}},
        "plugins": {
            f"{__name__}.FixedUsersAuthPlugin": {},
            f"{__name__}.PrefixTopicPlugin": {},
            f"{__name__}.EventRecorderPlugin": {},
        },
    }
