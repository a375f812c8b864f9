"""Lean MQTT sessions: what amqtt keeps per connected client, in less memory.

amqtt 0.12.1 gives every session (one per CONNECT) its own `transitions.Machine` for three states
(new -> connected <-> disconnected). Building it cost 142 us, and it held about 16 KB, of the
58 KB a connected client cost the broker (tracemalloc, 500 clients). `SessionStates` offers what
amqtt and `HardenedBroker` use of it (`state`, `connect()`, `disconnect()`, `is_<state>()`) with
the same rules, in a few slotted attributes.

Each client also had four `asyncio.Queue`s (two in its session, two in its protocol handler), at
about 3.3 KB each even when empty (three deques apiece). `LeanQueue` is the unbounded subset of
`asyncio.Queue` that amqtt uses (`put`, `put_nowait`, `get`, `get_nowait`, `empty`, `qsize`),
holding nothing while empty.

amqtt builds the session of each CONNECT inside `BrokerProtocolHandler.init_from_connect` from
the module-level name `Session`. `lean_init_from_connect` is that same upstream function, run with
`Session` bound to `LeanSession` in its own copy of the module's globals: amqtt's module is left
alone, so a plain amqtt `Broker` in the same process still builds amqtt's sessions (patching the
module name, as this module once did, turned every later plain broker lean too). It fits
amqtt==0.12.1 (pinned, like the rest of `iotbiz.broker.hardened`).
"""

from __future__ import annotations

import asyncio
import contextlib
import types
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from amqtt.mqtt.protocol import broker_handler
from amqtt.session import Session
from transitions import MachineError

T = TypeVar("T")

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


class LeanQueue(Generic[T]):
    """An unbounded FIFO with asyncio.Queue's methods that amqtt uses; empty, it holds two None."""

    __slots__ = ("_getters", "_items", "listener")

    def __init__(self) -> None:
        self._items: deque[T] | None = None
        self._getters: list[asyncio.Future[None]] | None = None
        # called after each put: how the broker's message loop of a connection learns of work
        # without a task waiting on each of its queues
        self.listener: Callable[[], None] | None = None

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: T) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        if self._getters:
            self._wake_one()
        if self.listener is not None:
            self.listener()

    async def put(self, item: T) -> None:
        self.put_nowait(item)  # unbounded: never waits

    def get_nowait(self) -> T:
        if not self._items:
            raise asyncio.QueueEmpty
        item = self._items.popleft()
        if not self._items:
            self._items = None
        return item

    async def get(self) -> T:
        while not self._items:
            getter = asyncio.get_running_loop().create_future()
            if self._getters is None:
                self._getters = []
            self._getters.append(getter)
            try:
                await getter
            except BaseException:
                getter.cancel()
                with contextlib.suppress(ValueError):
                    self._getters.remove(getter)
                if self._items and not getter.cancelled():
                    self._wake_one()  # this getter was woken for an item it will not take
                raise
        return self.get_nowait()

    def items(self) -> list[T]:
        """What is queued, oldest first (for inspection)."""
        return list(self._items or ())

    def _wake_one(self) -> None:
        while self._getters:
            getter = self._getters.pop(0)
            if not getter.done():
                getter.set_result(None)
                break
        if not self._getters:
            self._getters = None


class LeanSession(Session):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retained_messages: Any = LeanQueue[Any]()  # replaces the asyncio.Queues Session made
        self.delivered_message_queue: Any = LeanQueue[Any]()

    def _init_states(self) -> None:
        self.transitions = SessionStates(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.retained_messages = LeanQueue[Any]()
        self.delivered_message_queue = LeanQueue[Any]()


def _with_lean_sessions(function: Any) -> Any:
    """`function` (amqtt code) with the global name `Session` meaning `LeanSession`."""
    if function.__closure__ is not None:  # pragma: no cover - amqtt 0.12.1's has none
        raise TypeError(f"{function.__qualname__} has a closure; cannot rebind its globals")
    lean_globals = {**function.__globals__, "Session": LeanSession}
    rebound = types.FunctionType(
        function.__code__, lean_globals, function.__name__, function.__defaults__
    )
    rebound.__kwdefaults__ = function.__kwdefaults__
    rebound.__qualname__ = function.__qualname__
    return rebound


# amqtt's `BrokerProtocolHandler.init_from_connect` (the function under its classmethod), building
# a `LeanSession`; `HardenedProtocolHandler.init_from_connect` calls it.
lean_init_from_connect = _with_lean_sessions(
    broker_handler.BrokerProtocolHandler.init_from_connect.__func__
)
