"""Linux process control for the supervisor: the child's environment, process groups, orphans.

- `die_with_agent` gives a spawned child PR_SET_PDEATHSIG = SIGKILL, so it dies with the agent.
  The signal follows the thread that forks (the event loop's) and does not cover the child's own
  descendants.
- `become_subreaper` (PR_SET_CHILD_SUBREAPER) makes orphaned grandchildren the agent's, and
  `reap_orphans` reaps those of them that have exited.
- `signal_group` signals a whole process group (each app leads its own session and group);
  `terminate_group` stops one (SIGTERM, then SIGKILL), `clear_group` kills what an app left.
- `ProcessUsage` measures the CPU and memory of process trees with psutil.
- `resolve_user` and `spawn`: an app's process (or its health check's) runs as the app's `user`
  (uid, primary group, supplementary groups as initgroups(3) gives them, and HOME, USER and
  LOGNAME from its passwd entry, as systemd's User= does; supervisord changes only the uid and
  gid), in its own session, stdin from /dev/null, killed with the agent.

Where there is no prctl(2) (not Linux) the first two do nothing and `reap_orphans` finds nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import pwd
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

KILL_WAIT_S = 5.0  # how long a SIGKILLed process may take to be reaped

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True, slots=True)
class RunAs:
    """The user an app runs as, from the passwd and group databases."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups, the primary one included (initgroups)
    home: str


class UserSwitchRefused(PermissionError):
    """The agent is not root and the app's user is not the agent's: it can never start."""


def resolve_user(user: str) -> RunAs:
    """The app's `user` (a name, or a uid in digits as supervisord reads it). LookupError when
    there is no such user, UserSwitchRefused when the agent cannot become it. Blocking (the
    databases may be remote, through NSS): call it in a thread."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError) as exc:
        raise LookupError(f"no such user {user!r}") from exc
    euid = os.geteuid()
    if euid not in (0, entry.pw_uid):
        raise UserSwitchRefused(
            f"cannot run as user {user!r} (uid {entry.pw_uid}): "
            f"the agent runs as uid {euid}, not root"
        )
    groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)


def child_env(extra: dict[str, str] | None, run_as: RunAs | None = None) -> dict[str, str] | None:
    """The app's environment: the agent's own (passed through, not read), HOME, USER and LOGNAME
    of the app's user when it has one, then the app's `env`. None: the agent's, unchanged."""
    if run_as is None:
        return None if extra is None else {**os.environ, **extra}
    own = {"HOME": run_as.home, "USER": run_as.name, "LOGNAME": run_as.name}
    return {**os.environ, **own, **(extra or {})}


async def spawn(
    command: Sequence[str],
    *,
    cwd: Path | None,
    env: dict[str, str] | None,
    user: str | None,
    output: int,
) -> asyncio.subprocess.Process:
    """Start `command` in a session of its own, as `user` (`resolve_user`, in a thread), stdin
    from /dev/null, stdout and stderr to `output` (a file descriptor or subprocess.DEVNULL),
    killed with the agent. Raises LookupError (no such user), UserSwitchRefused, OSError,
    ValueError or SubprocessError when it cannot be started."""
    run_as = None if user is None else await asyncio.to_thread(resolve_user, user)
    switch: dict[str, Any] = {}
    if run_as is not None and os.geteuid() == 0:  # else resolve_user found the agent's own user
        switch = {"user": run_as.uid, "group": run_as.gid, "extra_groups": list(run_as.groups)}
    # subprocess runs preexec_fn after the user switch, which would clear PR_SET_PDEATHSIG.
    return await asyncio.create_subprocess_exec(
        *command,
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=output,
        cwd=cwd,
        env=child_env(env, run_as),
        start_new_session=True,
        preexec_fn=die_with_agent(),
        **switch,
    )


def describe_exit(returncode: int | None) -> str:
    """How a process ended, for logs and events: "exit 1", "killed by SIGKILL"."""
    if returncode is None:
        return "exit status unknown"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit {returncode}"


def signal_group(pgid: int, signum: signal.Signals) -> None:
    """Send `signum` to process group `pgid`; an empty group is not an error."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass  # the group is empty
    except PermissionError as exc:
        log.warning("cannot send %s to process group %d: %s", signum.name, pgid, exc)


class ProcessUsage:
    """CPU and memory of process trees, measured with psutil; `measure` runs in a worker thread.
    psutil reports a process's CPU use since the previous call on the same object, so the objects
    are kept from one sample to the next; a tree seen for the first time has no CPU figure yet."""

    def __init__(self) -> None:
        self._known: dict[int, psutil.Process] = {}

    def measure(self, leaders: list[int]) -> dict[int, tuple[float | None, int | None]]:
        known, self._known = self._known, {}
        result: dict[int, tuple[float | None, int | None]] = {}
        for leader in leaders:
            try:
                root = psutil.Process(leader)
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            primed = known.get(leader) == root
            cpu, rss = 0.0, 0
            for member in tree:
                proc = known.get(member.pid)
                if proc is None or proc != member:
                    proc = member
                try:
                    with proc.oneshot():
                        cpu += proc.cpu_percent(interval=None)
                        rss += proc.memory_info().rss
                except psutil.Error:
                    continue
                self._known[proc.pid] = proc
            result[leader] = (cpu if primed else None, rss)
        return result


async def terminate_group(
    name: str, pgid: int, exited: asyncio.Task[int], stop_timeout_s: float
) -> None:
    """SIGTERM the app `name`'s process group; SIGKILL it if the leader, whose exit `exited`
    awaits, outlives `stop_timeout_s`."""
    signal_group(pgid, signal.SIGTERM)
    done, _ = await asyncio.wait({exited}, timeout=stop_timeout_s)
    if done:
        return
    log.warning("%s: still running %g s after SIGTERM, killing it", name, stop_timeout_s)
    signal_group(pgid, signal.SIGKILL)
    done, _ = await asyncio.wait({exited}, timeout=KILL_WAIT_S)
    if not done:
        log.error("%s: pid %d survived SIGKILL for %g s", name, pgid, KILL_WAIT_S)


async def clear_group(
    pgid: int, exited: asyncio.Task[int], output: asyncio.Task[None], drain_s: float
) -> None:
    """After a run of the app that leads group `pgid`: SIGKILL the group (the leader too when
    `exited` has not seen it exit, i.e. the run was cancelled), so that nothing it started
    outlives it, then give its `output` task `drain_s` seconds to read the pipe to its end."""
    if not exited.done():
        signal_group(pgid, signal.SIGKILL)
        await asyncio.wait({exited}, timeout=KILL_WAIT_S)
    signal_group(pgid, signal.SIGKILL)  # what the leader left behind in its group
    await asyncio.wait({output}, timeout=drain_s)
    await cancel(output)


async def wait_event(event: asyncio.Event, delay: float) -> bool:
    """Wait up to `delay` seconds for `event`: whether it was set."""
    try:
        async with asyncio.timeout(delay):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def cancel(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel `tasks` and wait for them; log (do not raise) what they failed with."""
    for task in tasks:
        if task is None:
            continue
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            try:
                await task
            except Exception:
                log.exception("task %s failed", task.get_name())


# -- prctl(2) ------------------------------------------------------------------------------------


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl(2), or None where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    prctl: Callable[..., int] = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]  # type: ignore[attr-defined]
    prctl.restype = ctypes.c_int  # type: ignore[attr-defined]
    return prctl


def become_subreaper() -> bool:
    """Make this process the reaper of its descendants' orphans (Linux), so that an app's
    grandchild whose parent died stays under the agent, which reaps it. False where unsupported."""
    prctl = _prctl()
    if prctl is None:
        return False
    if prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("cannot become a child subreaper: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


def die_with_agent() -> Callable[[], None] | None:
    """A preexec_fn that makes the child die with the agent (Linux), or None."""
    prctl = _prctl()
    if prctl is None:
        return None
    return functools.partial(_set_death_signal, prctl, os.getpid())


def _set_death_signal(prctl: Callable[..., int], agent_pid: int) -> None:
    """In the child, between fork and exec: SIGKILL when the agent dies. If the agent died before
    this ran, the child has been reparented already: it leaves at once."""
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != agent_pid:
        os._exit(1)


# -- orphans -------------------------------------------------------------------------------------


def reap_orphans() -> int:
    """Reap zombie children that no one else awaits: apps' descendants the kernel handed to the
    agent (a subreaper) when their parent died. They are told from the agent's own spawns, which
    asyncio awaits, by their session: neither the agent's nor one they lead. Runs in a thread;
    needs Linux's /proc/PID/task/TID/children (elsewhere it finds nothing)."""
    own_session = os.getsid(0)
    reaped = 0
    for pid in _child_pids():
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stream:
                fields = stream.read().rpartition(")")[2].split()  # after "PID (COMMAND)"
            state, session = fields[0], int(fields[3])
        except (OSError, IndexError, ValueError):
            continue
        if state != "Z" or session in (own_session, pid):
            continue
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                reaped += 1
    return reaped


def _child_pids() -> list[int]:
    task_dir = Path("/proc/self/task")
    try:
        threads = list(task_dir.iterdir())
    except OSError:
        return []
    pids: list[int] = []
    for thread in threads:
        with contextlib.suppress(OSError):
            pids.extend(int(pid) for pid in (thread / "children").read_text().split())
    return pids
