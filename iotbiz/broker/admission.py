"""Which TCP connections the broker takes: caps in all, per client address, and per address
while the CONNECT has not come yet.

A socket that never sends CONNECT holds a file descriptor until `connect_timeout`; without a
cap, a pool of them reopened as they time out takes every descriptor the process has and
devices can no longer connect (the issue's attack: 1,100 such sockets made 8 of 8 CONNECTs
fail). A device sends its CONNECT within milliseconds, so `max_pending_per_address` can be small;
`max_per_address` stays large, for a gateway with many devices behind one address; `max_total`
sits below the process's open-file limit. A connection over a cap is closed at once, counted in
`refused`, and logged (at DEBUG: a flood must not flood the log). `LoginBrake` slows down
refused logins from one address.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class Ticket:
    """One admitted connection; `connect_read()` once its CONNECT came, `release()` at its end."""

    admission: Admission
    address: str
    pending: bool = True
    released: bool = False

    def connect_read(self) -> None:
        if self.pending and not self.released:
            self.pending = False
            self.admission._pending[self.address] -= 1
            if self.admission._pending[self.address] <= 0:
                del self.admission._pending[self.address]

    def release(self) -> None:
        if self.released:
            return
        self.connect_read()
        self.released = True
        admission = self.admission
        admission.open -= 1
        admission._by_address[self.address] -= 1
        if admission._by_address[self.address] <= 0:
            del admission._by_address[self.address]


@dataclass(slots=True)
class Admission:
    max_total: int
    max_per_address: int
    max_pending_per_address: int
    open: int = 0
    refused: int = 0
    _by_address: Counter[str] = field(default_factory=Counter)
    _pending: Counter[str] = field(default_factory=Counter)

    def admit(self, address: str) -> Ticket | None:
        """A ticket for a new connection from `address`, or None if it is over a cap."""
        if (
            self.open >= self.max_total
            or self._by_address[address] >= self.max_per_address
            or self._pending[address] >= self.max_pending_per_address
        ):
            self.refused += 1
            return None
        self.open += 1
        self._by_address[address] += 1
        self._pending[address] += 1
        return Ticket(self, address)

    def pending(self, address: str) -> int:
        return self._pending[address]


class LoginBrake:
    """Slows refused logins down per client address: the first `free` refusals within
    `window_s` are answered at once; each one after waits twice as long as the one before
    (0.25 s, 0.5 s, ...) up to `max_delay_s` before its CONNACK 5. A guesser from one address is
    slowed to one try every `max_delay_s`, and the connection it holds meanwhile counts against
    the admission caps. At most `MAX_ADDRESSES` addresses are remembered (the stalest go first).
    """

    MAX_ADDRESSES = 10_000
    FIRST_DELAY_S = 0.25

    def __init__(
        self,
        free: int,
        max_delay_s: float,
        *,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free = free
        self.max_delay_s = max_delay_s
        self.window_s = window_s
        self._clock = clock
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()  # count, first at
        self.slowed = 0  # refusals that were delayed

    def refused(self, address: str) -> float:
        """Note one refused login from `address`; the seconds to wait before answering it."""
        now = self._clock()
        count, since = self._failures.pop(address, (0, now))
        if now - since > self.window_s:
            count, since = 0, now
        count += 1
        self._failures[address] = (count, since)
        while len(self._failures) > self.MAX_ADDRESSES:
            self._failures.popitem(last=False)
        if count <= self.free or self.max_delay_s <= 0:
            return 0.0
        self.slowed += 1
        return float(min(self.max_delay_s, self.FIRST_DELAY_S * 2 ** (count - self.free - 1)))
