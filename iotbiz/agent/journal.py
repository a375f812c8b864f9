"""The update journal's record and the update command's arguments (see iotbiz.agent.updates,
which owns the state machine: its states, edges and every write of a journal)."""

from __future__ import annotations

import enum
import re
import time
from dataclasses import dataclass, field
from typing import Any

from iotbiz.agent.releases import UpdateError

VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}", re.ASCII)
SHA256 = re.compile(r"[0-9a-fA-F]{64}", re.ASCII)


class State(enum.StrEnum):
    DOWNLOADING = "downloading"
    VERIFIED = "verified"
    STAGED = "staged"
    SWITCHING = "switching"
    TRIAL = "trial"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    REFUSED = "refused"


FINAL = frozenset({State.COMMITTED, State.ROLLED_BACK, State.REFUSED})


@dataclass(frozen=True, slots=True)
class Journal:
    """One app's last update (or rollback), as written to its journal file."""

    app: str
    version: str
    state: State
    previous: str | None  # the release that ran before (None: the first release)
    url: str
    sha256: str
    size: int
    signature: str | None
    force: bool = False
    command_id: str | None = None
    reason: str | None = None
    bad: tuple[str, ...] = ()
    updated_at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        fields = {name: getattr(self, name) for name in self.__slots__}
        return {**fields, "state": self.state.value, "bad": list(self.bad)}

    @classmethod
    def from_json(cls, data: Any) -> Journal | None:
        try:
            return cls(
                app=str(data["app"]),
                version=str(data["version"]),
                state=State(data["state"]),
                previous=None if data["previous"] is None else str(data["previous"]),
                url=str(data["url"]),
                sha256=str(data["sha256"]),
                size=int(data["size"]),
                signature=data.get("signature"),
                force=bool(data.get("force", False)),
                command_id=data.get("command_id"),
                reason=data.get("reason"),
                bad=tuple(str(version) for version in data.get("bad", ())),
                updated_at=float(data.get("updated_at", 0.0)),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def result(self) -> dict[str, Any]:
        """The command's result once the update ended (the spec's reply)."""
        outcome = self.state.value if self.state in FINAL else "rolled_back"
        return {
            "outcome": outcome,
            "app": self.app,
            "version": self.version,
            "reason": self.reason,
            "previous": self.previous,
        }


OPERATOR_ROLLBACK = "rollback requested by the operator"


def update_args(args: dict[str, Any]) -> tuple[str, str, str, int, str | None, bool]:
    """(version, url, sha256, size, signature, force) from the update command's args."""
    version, url, sha256 = args.get("version"), args.get("url"), args.get("sha256")
    size, signature, force = args.get("size"), args.get("signature"), args.get("force", False)
    if not isinstance(version, str) or not VERSION.fullmatch(version):
        raise UpdateError("args.version must be 1 to 64 of A-Z a-z 0-9 _ . + -")
    if not isinstance(url, str) or not url.startswith("/") or url.startswith("//"):
        raise UpdateError("args.url must be a path on the registrar")
    if not isinstance(sha256, str) or not SHA256.fullmatch(sha256):
        raise UpdateError("args.sha256 must be 64 hex digits")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise UpdateError("args.size must be a positive whole number")
    if signature is not None and not isinstance(signature, str):
        raise UpdateError("args.signature must be a string or null")
    if isinstance(force, str):
        force = force.lower() in ("1", "true", "yes")
    if not isinstance(force, bool):
        raise UpdateError("args.force must be true or false")
    return version, url, sha256, size, signature, force
