"""Lean MQTT sessions: amqtt's `Session` without a `transitions.Machine` per session.

amqtt 0.12.1 gives every session (one per CONNECT) its own `transitions.Machine` for three states
(new -> connected <-> disconnected). Building it cost 142 us, and it held about 16 KB, of the
58 KB a connected client cost the broker (tracemalloc, 500 clients). `SessionStates` offers what
amqtt and `HardenedBroker` use of it (`state`, `connect()`, `disconnect()`, `is_<state>()`) with
the same rules, in a few slotted attributes.

amqtt builds the session of each CONNECT inside `BrokerProtocolHandler.init_from_connect` from
the module-level name `Session`; `use_lean_sessions()` points that name at `LeanSession`. It fits
amqtt==0.12.1 (pinned, like the rest of `iotbiz.broker.hardened`).
"""

from __future__ import annotations

from amqtt.mqtt.protocol import broker_handler
from amqtt.session import Session
from transitions import MachineError

NEW, CONNECTED, DISCONNECTED = "new", "connected", "disconnected"


class SessionStates:
    """A session's connection state, with the transitions amqtt's Machine allowed:
    new/disconnected -> connected (`connect`), any -> disconnected (`disconnect`)."""

    __slots__ = ("_session", "state")

    def __init__(self, session: LeanSession) -> None:
        self._session = session
        self.state = NEW

    def connect(self) -> None:
        if self.state == CONNECTED:  # as transitions: no "connect" from "connected"
            raise MachineError(f"can't trigger event connect from state {CONNECTED}")
        self.state = CONNECTED  # NEW/DISCONNECTED -> CONNECTED
        self._session._on_enter_connected()

    def disconnect(self) -> None:
        self.state = DISCONNECTED  # NEW/CONNECTED/DISCONNECTED -> DISCONNECTED
        self._session._on_enter_disconnected()

    def is_new(self) -> bool:
        return self.state == NEW

    def is_connected(self) -> bool:
        return self.state == CONNECTED

    def is_disconnected(self) -> bool:
        return self.state == DISCONNECTED


class LeanSession(Session):
    def _init_states(self) -> None:
        self.transitions = SessionStates(self)


def use_lean_sessions() -> None:
    """Make amqtt build `LeanSession`s for incoming connections."""
    broker_handler.Session = LeanSession
