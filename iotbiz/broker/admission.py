"""Which TCP connections the broker takes: caps in all, per client address, and per address
while the CONNECT has not come yet.

A socket that never sends CONNECT holds a file descriptor until `connect_timeout`; without a
cap, a pool of them reopened as they time out takes every descriptor the process has and
devices can no longer connect (the issue's attack: 1,100 such sockets made 8 of 8 CONNECTs
fail). A device sends its CONNECT within milliseconds, so `max_pending_per_address` can be small;
`max_per_address` stays large, for a gateway with many devices behind one address; `max_total`
sits below the process's open-file limit. A connection over a cap is closed at once, counted in
`refused`, and logged (at DEBUG: a flood must not flood the log).
"""

from __future__ import annotations

from collections import Counter
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
