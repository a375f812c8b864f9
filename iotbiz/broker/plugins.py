"""The amqtt plugins that put IoTBiz's rules into the broker.

They hold no logic of their own: `Authority` decides, `PresenceRecorder` records. amqtt builds
plugins from dotted paths in its config; the embedded broker then `bind`s them to the platform's
objects. An unbound plugin refuses everything. Plugins never raise (an exception would drop the
client's connection): failures are logged and the request denied.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from amqtt.contexts import Action
from amqtt.mqtt.connack import SERVER_UNAVAILABLE
from amqtt.plugins.base import BaseAuthPlugin, BasePlugin, BaseTopicPlugin
from amqtt.session import Session

from iotbiz.broker.authority import Authority, Principal, Refusal, Role
from iotbiz.broker.hardened import REFUSAL_CODE
from iotbiz.names import parse_device_name
from iotbiz.presence import PresenceRecorder

log = logging.getLogger(__name__)

PRINCIPAL = "iotbiz.principal"  # key of the session attribute holding the Principal


def principal_of(session: Session | None) -> Principal | None:
    if session is None:
        return None
    principal = session.attributes.get(PRINCIPAL)
    return principal if isinstance(principal, Principal) else None


class AuthPlugin(BaseAuthPlugin):
    """Authenticates devices and accounts through the `Authority`.

    A login the authority could not check (`Refusal.UNAVAILABLE`: bcrypt queue at its share, or
    the store failing) is refused with CONNACK 3, server unavailable, through the hardened
    broker's `REFUSAL_CODE`; any other refusal is CONNACK 5, not authorised.
    """

    authority: Authority | None = None

    @dataclass
    class Config:
        pass

    async def authenticate(self, *, session: Session) -> bool:
        session.attributes.pop(PRINCIPAL, None)
        session.attributes.pop(REFUSAL_CODE, None)
        if self.authority is None:
            log.error("MQTT login refused: authentication plugin not bound")
            return False
        try:
            principal = await self.authority.authenticate(
                session.username, session.password, session.client_id
            )
        except Exception:  # never raise into amqtt
            log.exception("MQTT login of %s refused: unexpected error", session.username)
            return False
        if principal is Refusal.UNAVAILABLE:
            session.attributes[REFUSAL_CODE] = SERVER_UNAVAILABLE
        if not isinstance(principal, Principal):
            return False
        session.attributes[PRINCIPAL] = principal
        return True


class TopicPlugin(BaseTopicPlugin):
    """Applies the per-principal ACL to publish, subscribe and receive."""

    authority: Authority | None = None

    @dataclass
    class Config:
        pass

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        return self.allows(session, topic, action)

    def allows(self, session: Session | None, topic: str | None, action: Action | None) -> bool:
        """The same decision, callable without a coroutine (for the broker's hot paths)."""
        principal = principal_of(session)
        if self.authority is None or principal is None or topic is None:
            return False
        if action == Action.PUBLISH:
            return self.authority.may_publish(principal, topic)
        if action == Action.SUBSCRIBE:
            return self.authority.may_subscribe(principal, topic)
        if action == Action.RECEIVE:
            return self.authority.may_receive(principal, topic)
        return False


class PresencePlugin(BasePlugin[Any]):
    """Turns the broker's connect and disconnect events of devices into presence."""

    presence: PresenceRecorder | None = None

    @dataclass
    class Config:
        pass

    async def on_broker_client_connected(self, *, client_id: str, client_session: Session) -> None:
        self._note(client_session, connected=True)

    async def on_broker_client_disconnected(
        self, *, client_id: str, client_session: Session
    ) -> None:
        self._note(client_session, connected=False)

    def _note(self, session: Session, *, connected: bool) -> None:
        principal = principal_of(session)
        if self.presence is None or principal is None or principal.role is not Role.DEVICE:
            return
        name = parse_device_name(principal.username)
        if name is None:  # pragma: no cover - device principals always hold a valid name
            return
        if connected:
            self.presence.connected(name)
        else:
            self.presence.disconnected(name)
