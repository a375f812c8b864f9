"""Updates of release apps: a journaled state machine that never strands the device.

Every step writes the app's journal (`state_dir/updates/APP.json`, atomically and fsynced) BEFORE
it is taken; every edge is made by `Updater._enter` and listed in `EDGES`:

    (start) -> downloading         an update accepted (free space checked first)
    (start) -> refused             refused before anything changed (bad signature, no space...)
    downloading -> verified        size, sha256 (and signature) of the whole artifact checked
    downloading -> refused         download refused (401/403/404, retries spent) or bad artifact
    verified -> staged             unpacked into read-only releases/V
    verified -> refused            bad archive, no space for its unpacked size
    staged -> switching            about to point `current` at releases/V
    switching -> trial             `current` replaced (os.replace of a new link, folder fsynced)
    trial -> committed             the app stayed RUNNING (and healthy) for update_trial_s
    switching/trial -> rolling_back  the switch failed, the app crashed or failed a health check
    rolling_back -> rolled_back    `current` back at the previous release (or removed when there
                                   was none), the app restarted, V marked bad and removed
    committed/rolled_back/refused -> rolling_back  the operator's `rollback` (V: the release
                                   left; not marked bad)

Recovery (`Updater.recover`, at agent start, before the apps start) for each journal state:
downloading, verified, staged: `current` was never touched; the update goes on from that state
(the download resumes with Range) once the apps run. switching: the switch is made again (it is
idempotent) and the trial follows. trial, rolling_back: rolled back at once, before the app
starts, reason "agent restarted during the trial": a release never confirmed must not run after
an agent death it may have caused. committed, rolled_back, refused: final, nothing to do. A
hidden `.V.partial` folder (an unpack cut short) is always removed: a half-unpacked release never
runs. Updates whose journal names a command get their reply once recovered (`finished`).

Two releases are kept: the current one and the one before it; a new update first removes any
other. A version rolled back is "bad" (kept in the journal's `bad` list) and refused until an
update with `force`.

The test hook `TEST_IOTBIZ_KILL_AFTER=STATE@VERSION` (see iotbiz.settings.update_kill_hook)
SIGKILLs the agent right after writing that journal state, as a power cut would.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import tarfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from iotbiz.agent import releases
from iotbiz.agent.download import download
from iotbiz.agent.files import make_private_dir, read_json, write_json
from iotbiz.agent.journal import FINAL, OPERATOR_ROLLBACK, Journal, State, update_args
from iotbiz.agent.releases import SignatureCheck, UpdateError
from iotbiz.agent.supervisor import Supervisor
from iotbiz.agent.trial import TrialFailed, run_trial
from iotbiz.settings import AgentSettings, update_kill_hook
from iotbiz.tls import client_context

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 2.0
RESTARTED_IN_TRIAL = "agent restarted during the trial"


_S = State
EDGES: dict[State | None, frozenset[State]] = {
    None: frozenset({_S.DOWNLOADING, _S.REFUSED}),  # (start) -> downloading, -> refused
    _S.DOWNLOADING: frozenset({_S.VERIFIED, _S.REFUSED}),
    _S.VERIFIED: frozenset({_S.STAGED, _S.REFUSED}),
    _S.STAGED: frozenset({_S.SWITCHING}),
    _S.SWITCHING: frozenset({_S.TRIAL, _S.ROLLING_BACK}),
    _S.TRIAL: frozenset({_S.COMMITTED, _S.ROLLING_BACK}),
    _S.ROLLING_BACK: frozenset({_S.ROLLED_BACK}),
    _S.COMMITTED: frozenset({_S.ROLLING_BACK}),  # the operator's rollback
    _S.ROLLED_BACK: frozenset({_S.ROLLING_BACK}),  # the operator's rollback
    _S.REFUSED: frozenset({_S.ROLLING_BACK}),  # the operator's rollback
}


def release_cwd(state_dir: Path, app: str) -> Path:
    """Where a release app runs: the `current` symlink into its releases."""
    return state_dir / "apps" / app / "current"


EventSink = Callable[[dict[str, Any]], None]
CredentialsSource = Callable[[], Awaitable[tuple[str, str]]]
Finished = tuple[str, dict[str, Any]]  # (command id, result)
Answer = Callable[[str, dict[str, Any]], Awaitable[None]]


class Updater:
    """Updates and rolls back the release apps of `settings` through `supervisor`."""

    def __init__(
        self,
        settings: AgentSettings,
        supervisor: Supervisor,
        on_event: EventSink,
        credentials: CredentialsSource,
    ) -> None:
        self._settings = settings
        self._supervisor = supervisor
        self._on_event = on_event
        self._credentials = credentials
        self._apps = {app.name: app for app in settings.apps if app.release}
        self._signatures = (
            SignatureCheck(Path(settings.release_public_key))
            if settings.release_public_key
            else None
        )
        self._tls: ssl.SSLContext | None = (
            client_context(settings.ca_file)
            if settings.registrar_url.startswith("https:")
            else None
        )
        self._journal_dir = settings.state_dir / "updates"
        self._downloads = settings.state_dir / "downloads"
        self._tasks: dict[str, asyncio.Task[Journal]] = {}
        self._resume: list[Journal] = []  # updates to go on with once the apps run
        self._finished: list[Finished] = []
        self._kill_hook = update_kill_hook()
        self._loop: asyncio.AbstractEventLoop | None = None  # events from threads go through it

    # -- the public surface --------------------------------------------------------------------

    async def recover(self) -> None:
        """Make every release app consistent before the apps start. See the module docstring
        for what each journal state leads to."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._recover)

    def _recover(self) -> None:
        make_private_dir(self._journal_dir)
        make_private_dir(self._downloads)
        for name in self._apps:
            make_private_dir(self._releases(name))
            for path in self._releases(name).glob(".*.partial"):
                log.info("%s: removing %s, an unpack cut short", name, path.name)
                releases.remove_tree(path)
            journal = self._load(name)
            if journal is None:
                continue
            if journal.state in FINAL:
                if journal.command_id is not None:  # killed before its reply went out?
                    self._finished.append((journal.command_id, journal.result()))
                continue
            log.info("%s: update to %s found in state %s", name, journal.version, journal.state)
            if journal.state in (_S.DOWNLOADING, _S.VERIFIED, _S.STAGED):
                self._point_current(name, journal.previous)
                self._resume.append(journal)
            elif journal.state is _S.SWITCHING:
                self._point_current(name, journal.version)
                self._resume.append(journal)
            else:  # TRIAL, ROLLING_BACK
                if journal.state is _S.TRIAL:
                    # TRIAL -> ROLLING_BACK: the agent died during the trial
                    journal = self._enter(journal, _S.ROLLING_BACK, RESTARTED_IN_TRIAL)
                self._finish_rollback(journal, mark_bad=journal.reason != OPERATOR_ROLLBACK)
                if journal.command_id is not None:
                    final = self._load(name)
                    if final is not None:
                        self._finished.append((journal.command_id, final.result()))

    async def resume(self, answer: Answer) -> None:
        """Go on with the updates `recover` found under way (once the apps run); `answer` the
        command of each update that ended, in recovery or now."""
        tasks = [self._spawn(journal) for journal in self._resume]
        self._resume = []
        finished, self._finished = self._finished, []
        for command_id, result in finished:
            await answer(command_id, result)
        for task in tasks:
            journal = await asyncio.shield(task)
            if journal.command_id is not None:
                await answer(journal.command_id, journal.result())

    async def update(self, args: dict[str, Any], command_id: str | None) -> dict[str, Any]:
        """The `update` command: returns the result when the update ended. UpdateError (bad
        arguments, an update of this app already under way) becomes an error reply."""
        self._loop = asyncio.get_running_loop()
        name = self._release_app(args.get("app"))
        version, url, sha256, size, signature, force = update_args(args)
        running = self._tasks.get(name)
        if running is not None and not running.done():
            journal = self._load(name)
            if journal is not None and (journal.command_id, journal.version) == (
                command_id,
                version,
            ):
                return (await asyncio.shield(running)).result()
            raise UpdateError(f"an update of {name} is under way")
        previous = await asyncio.to_thread(self._current, name)
        last = await asyncio.to_thread(self._load, name)
        same_command = last is not None and command_id is not None and last.command_id == command_id
        if last is not None and same_command and last.state in FINAL:
            return last.result()  # delivered again after the agent restarted: its outcome
        bad = tuple(v for v in (last.bad if last else ()) if not (force and v == version))
        journal = Journal(
            app=name,
            version=version,
            state=_S.DOWNLOADING,
            previous=previous,
            url=url,
            sha256=sha256.lower(),
            size=size,
            signature=signature,
            force=force,
            command_id=command_id,
            bad=bad,
        )
        if previous == version:
            return {**replace(journal, state=_S.COMMITTED).result(), "reason": "already running"}
        refusal = await asyncio.to_thread(self._refusal, journal)
        if refusal is not None:
            # (start) -> REFUSED
            refused = await asyncio.to_thread(self._enter, journal, _S.REFUSED, refusal, True)
            return refused.result()
        # (start) -> DOWNLOADING
        journal = await asyncio.to_thread(self._enter, journal, _S.DOWNLOADING, None, True)
        return (await asyncio.shield(self._spawn(journal))).result()

    async def rollback(self, args: dict[str, Any]) -> dict[str, Any]:
        """The operator's `rollback`: back to the release before the current one."""
        self._loop = asyncio.get_running_loop()
        name = self._release_app(args.get("app"))
        running = self._tasks.get(name)
        if running is not None and not running.done():
            raise UpdateError(f"an update of {name} is under way")
        current = await asyncio.to_thread(self._current, name)
        target = await asyncio.to_thread(self._other_release, name, current)
        if current is None or target is None:
            raise UpdateError(f"{name} has no previous release to go back to")
        last = await asyncio.to_thread(self._load, name)
        journal = Journal(
            app=name,
            version=current,
            state=last.state if last else _S.COMMITTED,
            previous=target,
            url="",
            sha256="",
            size=0,
            signature=None,
            bad=last.bad if last else (),
        )
        # COMMITTED/ROLLED_BACK/REFUSED -> ROLLING_BACK
        journal = await asyncio.to_thread(self._enter, journal, _S.ROLLING_BACK, OPERATOR_ROLLBACK)
        await asyncio.to_thread(self._finish_rollback, journal, mark_bad=False)
        await self._supervisor.restart(name)
        final = await asyncio.to_thread(self._load, name)
        assert final is not None  # noqa: S101 - just written
        return final.result()

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    # -- the state machine ---------------------------------------------------------------------

    def _enter(
        self, journal: Journal, new: State, reason: str | None = None, fresh: bool = False
    ) -> Journal:
        """Write `journal` in state `new` (atomically, fsynced), log and announce the edge.
        Blocking. `fresh`: a new update, leaving no state (else the journal's own)."""
        left = None if fresh else journal.state
        if new not in EDGES[left]:
            log.error("%s: unexpected update transition %s -> %s", journal.app, left, new)
        entered = replace(journal, state=new, reason=reason, updated_at=time.time())
        write_json(self._journal_path(journal.app), entered.to_json())
        log.info(
            "%s: update %s: %s -> %s%s",
            journal.app,
            journal.version,
            left.value if left else "(start)",
            new.value,
            f" ({reason})" if reason else "",
        )
        event: dict[str, Any] = {
            "type": "update",
            "app": journal.app,
            "version": journal.version,
            "state": new.value,
        }
        if reason:
            event["reason"] = reason
        self._emit(event)
        if self._kill_hook == f"{new.value}@{journal.version}":
            log.warning("test hook: SIGKILL after writing %s", new.value)
            os.kill(os.getpid(), signal.SIGKILL)
        return entered

    def _spawn(self, journal: Journal) -> asyncio.Task[Journal]:
        task = asyncio.create_task(self._carry_out(journal), name=f"update {journal.app}")
        self._tasks[journal.app] = task
        return task

    async def _carry_out(self, journal: Journal) -> Journal:
        """Take `journal` from its state to a final one."""
        try:
            if journal.state is _S.DOWNLOADING:
                journal = await self._download(journal)  # DOWNLOADING -> VERIFIED
            if journal.state is _S.VERIFIED:
                journal = await asyncio.to_thread(self._stage, journal)  # VERIFIED -> STAGED
        except (UpdateError, OSError) as exc:
            # DOWNLOADING/VERIFIED -> REFUSED: nothing was changed
            reason = str(exc) if isinstance(exc, UpdateError) else f"cannot stage: {exc}"
            await asyncio.to_thread(self._discard, journal)
            return await asyncio.to_thread(self._enter, journal, _S.REFUSED, reason)
        try:
            if journal.state is _S.STAGED:
                # STAGED -> SWITCHING -> TRIAL
                journal = await asyncio.to_thread(self._enter, journal, _S.SWITCHING)
                await asyncio.to_thread(self._point_current, journal.app, journal.version)
            if journal.state is _S.SWITCHING:
                journal = await asyncio.to_thread(self._enter, journal, _S.TRIAL)
            await self._trial(journal)
        except (TrialFailed, OSError) as exc:
            reason = str(exc) if isinstance(exc, TrialFailed) else f"switch failed: {exc}"
            # SWITCHING/TRIAL -> ROLLING_BACK -> ROLLED_BACK
            journal = await asyncio.to_thread(self._enter, journal, _S.ROLLING_BACK, reason)
            await asyncio.to_thread(self._finish_rollback, journal, mark_bad=True)
            if journal.previous is not None:
                await self._supervisor.restart(journal.app)
            else:
                await self._supervisor.halt(journal.app, "no release installed")
            final = await asyncio.to_thread(self._load, journal.app)
            assert final is not None  # noqa: S101 - just written
            return final
        # TRIAL -> COMMITTED
        journal = await asyncio.to_thread(self._enter, journal, _S.COMMITTED)
        await asyncio.to_thread(self._prune, journal.app, journal.previous)
        return journal

    async def _download(self, journal: Journal) -> Journal:
        part = self._downloads / f"{journal.app}-{journal.version}.part"
        if self._signatures is not None:  # before a byte is fetched: unsigned is refused
            self._signatures.verify(journal.sha256, journal.signature)
        have = part.stat().st_size if part.exists() else 0
        await asyncio.to_thread(
            releases.check_free_space,
            self._settings.state_dir,
            releases.space_for_download(journal.size, have),
        )
        username, password = await self._credentials()
        url = self._settings.registrar_url.rstrip("/") + journal.url
        last = [0.0]

        def progress(done: int) -> None:  # called in the download thread
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S or done == journal.size:
                last[0] = now
                loop.call_soon_threadsafe(self._emit_progress, journal, done)

        loop = asyncio.get_running_loop()
        await download(url, part, journal.size, (username, password), self._tls, progress)
        try:
            await asyncio.to_thread(releases.verify_artifact, part, journal.size, journal.sha256)
        except UpdateError:
            await asyncio.to_thread(part.unlink, True)  # not to be resumed
            raise
        # DOWNLOADING -> VERIFIED
        return await asyncio.to_thread(self._enter, journal, _S.VERIFIED)

    def _stage(self, journal: Journal) -> Journal:
        """Unpack the verified artifact into releases/V (blocking)."""
        part = self._downloads / f"{journal.app}-{journal.version}.part"
        if not part.exists():
            raise UpdateError("the downloaded artifact is gone")
        releases.verify_artifact(part, journal.size, journal.sha256)  # again, after a restart
        self._prune(journal.app, keep=journal.previous)
        try:
            needed = releases.unpacked_size(part)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise UpdateError(f"bad archive: {exc}") from exc
        releases.check_free_space(self._settings.state_dir, needed)
        releases.unpack(part, self._releases(journal.app) / journal.version)
        part.unlink()
        # VERIFIED -> STAGED
        return self._enter(journal, _S.STAGED)

    async def _trial(self, journal: Journal) -> None:
        await run_trial(self._supervisor, self._apps[journal.app], self._settings.update_trial_s)

    def _finish_rollback(self, journal: Journal, *, mark_bad: bool) -> None:
        """ROLLING_BACK -> ROLLED_BACK (blocking): `current` at the previous release (removed
        when there is none), the new one marked bad and removed."""
        self._point_current(journal.app, journal.previous)
        bad = journal.bad
        if mark_bad:
            bad = (*tuple(v for v in bad if v != journal.version), journal.version)
            releases.remove_tree(self._releases(journal.app) / journal.version)
        self._enter(replace(journal, bad=bad), _S.ROLLED_BACK, journal.reason)

    # -- the device's folders ------------------------------------------------------------------

    def _releases(self, name: str) -> Path:
        return self._settings.state_dir / "apps" / name / "releases"

    def _journal_path(self, name: str) -> Path:
        return self._journal_dir / f"{name}.json"

    def _load(self, name: str) -> Journal | None:
        data = read_json(self._journal_path(name))
        return Journal.from_json(data) if isinstance(data, dict) else None

    def _current(self, name: str) -> str | None:
        """The version `current` points at, if it leads to an installed release."""
        link = release_cwd(self._settings.state_dir, name)
        if not link.is_symlink() or not link.is_dir():
            return None
        return Path(os.readlink(link)).name

    def _other_release(self, name: str, current: str | None) -> str | None:
        """The newest installed release that is not `current`."""
        others = [
            path
            for path in self._releases(name).iterdir()
            if releases.is_release_dir(path) and path.name != current
        ]
        return max(others, key=lambda path: path.stat().st_mtime).name if others else None

    def _point_current(self, name: str, version: str | None) -> None:
        """`current` -> releases/VERSION (None: no `current`), atomically: a new link renamed
        over the old one, then the folder fsynced. Idempotent."""
        link = release_cwd(self._settings.state_dir, name)
        if version is None:
            link.unlink(missing_ok=True)
        else:
            target = Path("releases") / version
            if link.is_symlink() and Path(os.readlink(link)) == target:
                return
            new = link.with_name(".current.new")
            new.unlink(missing_ok=True)
            os.symlink(target, new)
            os.replace(new, link)
        releases.fsync_dir(link.parent)
        log.info("%s: current -> %s", name, version or "(none)")

    def _prune(self, name: str, keep: str | None = None) -> None:
        """Keep the current release and `keep` (default: the newest other one); remove the rest."""
        current = self._current(name)
        keep = keep if keep is not None else self._other_release(name, current)
        for path in self._releases(name).iterdir():
            if path.name not in (current, keep) and not path.name.startswith(".current"):
                log.info("%s: removing old release %s", name, path.name)
                releases.remove_tree(path)

    def _discard(self, journal: Journal) -> None:
        part = self._downloads / f"{journal.app}-{journal.version}.part"
        if journal.state is _S.VERIFIED:
            part.unlink(missing_ok=True)

    def _refusal(self, journal: Journal) -> str | None:
        """Why `journal` is refused before anything changes (blocking), or None."""
        if journal.version in journal.bad:
            return f"{journal.version} was rolled back before: send it with force to retry"
        if self._signatures is not None:
            try:
                self._signatures.verify(journal.sha256, journal.signature)
            except UpdateError as exc:
                return str(exc)
        part = self._downloads / f"{journal.app}-{journal.version}.part"
        have = part.stat().st_size if part.exists() else 0
        try:
            releases.check_free_space(
                self._settings.state_dir, releases.space_for_download(journal.size, have)
            )
        except UpdateError as exc:
            return str(exc)
        return None

    def _release_app(self, name: Any) -> str:
        if not isinstance(name, str) or name not in self._apps:
            raise UpdateError("args.app must be the name of an app with release = true")
        return name

    def _emit(self, event: dict[str, Any]) -> None:
        """Announce `event` on the event loop (journal writes run in threads)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._emit, event)
            return
        try:
            self._on_event({**event, "ts": time.time()})
        except Exception:  # a broken sink must not stop an update
            log.exception("event sink failed on an update event")

    def _emit_progress(self, journal: Journal, done: int) -> None:
        self._emit(
            {
                "type": "update",
                "app": journal.app,
                "version": journal.version,
                "state": _S.DOWNLOADING.value,
                "bytes": done,
            }
        )
