"""The rollouts' store operations on both backends (SQLite and PostgreSQL): creation and its
refusals, batches started once, results settled from the update commands, stop, completion,
abort, paging; and on PostgreSQL, two stores with their own pools (as two platform processes
have) starting and settling the same rollout at once. Replies, sends and expiries go through the
store's command operations, as the dispatcher makes them."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from iotbiz.errors import ConflictError, NotFoundError
from iotbiz.models import Command, CommandState
from iotbiz.names import DeviceName
from iotbiz.rollouts import RolloutEngine
from iotbiz.settings import RolloutSettings
from iotbiz.store import Rollout, RolloutDevice
from iotbiz.store.interface import PlatformStore
from iotbiz.store.postgres import PostgresStore
from tests.conftest import FakeClock
from tests.store_helpers import active_devices
from tests.test_store_failures import wait_until

pytestmark = pytest.mark.timeout(60)

SHA = "ab" * 32
ARGS = {"app": "web", "version": "2.0", "url": "/api/v1/releases/web/2.0", "sha256": SHA}


async def rollout_of(store: PlatformStore, names: list[DeviceName], **options: Any) -> Rollout:
    if await store.get_release("web", "2.0") is None:
        await store.add_release("web", "2.0", sha256=SHA, size=10, signature=None, actor="t")
    settings: dict[str, Any] = {
        "app": "web",
        "version": "2.0",
        "batch_size": 2,
        "max_failures": 0,
        "timeout_s": 60,
        "force": False,
        "actor": "ops",
    }
    rollout: Rollout = await store.create_rollout(names, **(settings | options))
    return rollout


# -- the commands' side, as the dispatcher changes it ------------------------------------------


async def reply(
    store: PlatformStore,
    command: Command,
    *,
    ok: bool = True,
    result: Any = None,
    error: str | None = None,
) -> None:
    finished = await store.finish_command(
        command.device, command.command_id, ok=ok, result=result, error=error
    )
    assert finished is not None


async def mark_sent(store: PlatformStore, command: Command) -> None:
    await store.mark_sent([command.command_id], store.now())


async def expire(store: PlatformStore) -> None:
    await store.expire_commands()


async def stored(store: PlatformStore, command_id: str) -> Command | None:
    return await store.get_command(command_id)


# -- both backends ------------------------------------------------------------------------------


async def test_a_rollout_is_its_devices_by_name_in_batches(
    any_store: PlatformStore, clock: FakeClock
) -> None:
    store = any_store
    names = await active_devices(store, "abc123", 3)
    others = [
        DeviceName(customer, "x")
        for customer in (
            "a_1",
            "B",
            "a-2",
        )  # bytes: B < a-2 < a_1 < abc123 (en-US: a_1, a-2, abc123, B)
    ]
    for name in others:
        await active_devices(store, name.customer_id, 0)
        await store.register_device(name, b"$2b$06$hash", ttl_s=60, actor="test")
        assert await store.activate_device(name, b"$2b$06$hash", actor="test")
    given = [names[2], others[0], names[0], names[2], others[1], others[2], names[1]]
    created = await rollout_of(store, given, batch_size=2, max_failures=3, force=True)
    expected = Rollout(
        rollout_id=created.rollout_id,
        app="web",
        version="2.0",
        state="running",
        reason=None,
        batch_size=2,
        max_failures=3,
        timeout_s=60.0,
        force=True,
        created_at=clock.now,
        finished_at=None,
        actor="ops",
        total=6,
        batch=-1,
        counts={"waiting": 6},
    )
    assert created == expected
    assert type(created.timeout_s) is float
    assert created.rollout_id.startswith("r-")
    assert len(created.rollout_id) == 18
    assert created.batches == 3
    assert await store.get_rollout(created.rollout_id) == expected
    assert await store.get_rollout("r-0000000000000000") is None
    in_order = ["B/x", "a-2/x", "a_1/x", "abc123/dev-00000", "abc123/dev-00001", "abc123/dev-00002"]
    assert await store.rollout_devices(created.rollout_id) == [
        RolloutDevice(DeviceName(*name.split("/")), i // 2, "waiting", None, None)
        for i, name in enumerate(in_order)
    ]
    assert [str(n) for n in await store.batch_names(created.rollout_id, 1)] == in_order[2:4]
    assert await store.batch_names(created.rollout_id, 3) == []
    [entry] = await store.audit_entries(subject=created.rollout_id)
    assert (entry.action, entry.actor, entry.detail) == (
        "rollout.start",
        "ops",
        {"app": "web", "version": "2.0", "devices": 6, "batch_size": 2, "max_failures": 3},
    )


async def test_a_rollout_is_refused_without_its_release_or_with_inactive_devices(
    any_store: PlatformStore,
) -> None:
    store = any_store
    names = await active_devices(store, "abc123", 2)
    with pytest.raises(NotFoundError) as refused:
        await store.create_rollout(
            names,
            app="web",
            version="9",
            batch_size=1,
            max_failures=0,
            timeout_s=60,
            force=False,
            actor="ops",
        )
    assert str(refused.value) == "no release web 9 (add it with iotbiz release add)"
    pending = DeviceName("abc123", "pending-1")
    await store.register_device(pending, b"$2b$06$hash", ttl_s=60, actor="test")
    missing = [DeviceName("abc123", f"nope-{i:02d}") for i in range(21)]
    with pytest.raises(NotFoundError) as refused:
        await rollout_of(store, [*names, pending])
    assert str(refused.value) == "not active devices (1): abc123/pending-1"
    with pytest.raises(NotFoundError) as refused:
        await rollout_of(store, [*reversed(missing), names[0]])
    shown = ", ".join(str(n) for n in missing[:20])
    assert str(refused.value) == f"not active devices (21): {shown} ..."
    assert await store.list_rollouts() == []
    [newest] = await store.audit_entries(limit=1)
    assert newest.action == "release.add"  # nothing written after it


async def test_a_batch_starts_once_with_one_update_per_active_device(
    any_store: PlatformStore, clock: FakeClock
) -> None:
    store = any_store
    names = await active_devices(store, "abc123", 4)
    rollout = await rollout_of(store, names)
    rollout_id = rollout.rollout_id
    assert await store.start_rollout_batch(rollout_id, 1, ARGS, expires_at=clock.now + 60) == []
    assert await store.settle_rollout(rollout_id) == 0  # nothing started: batch 0 is next
    commands = await store.start_rollout_batch(rollout_id, 0, ARGS, expires_at=clock.now + 60)
    assert [c.device for c in commands] == names[:2]
    batch_id = commands[0].batch_id
    assert batch_id.startswith("b-")
    for command in commands:
        assert command == Command(
            command_id=command.command_id,
            customer_id="abc123",
            device_id=command.device_id,
            action="update",
            args=ARGS,
            state=CommandState.QUEUED,
            created_at=clock.now,
            expires_at=clock.now + 60,
            actor="ops",
            batch_id=batch_id,
        )
        assert await stored(store, command.command_id) == command
    # again (a restarted engine): nothing
    assert await store.start_rollout_batch(rollout_id, 0, ARGS, expires_at=clock.now + 60) == []
    assert await store.batch_names(rollout_id, 0) == []
    shown = await store.get_rollout(rollout_id)
    assert (shown.batch, shown.counts) == (0, {"updating": 2, "waiting": 2})
    devices = await store.rollout_devices(rollout_id)
    assert [(d.result, d.command_id) for d in devices] == [
        ("updating", commands[0].command_id),
        ("updating", commands[1].command_id),
        ("waiting", None),
        ("waiting", None),
    ]
    entries = list(reversed(await store.audit_entries(limit=4)))
    assert [(e.action, e.subject, e.actor) for e in entries[1:]] == [
        ("command.send", "abc123/dev-00000", "ops"),
        ("command.send", "abc123/dev-00001", "ops"),
        ("rollout.batch", rollout_id, "ops"),
    ]
    assert entries[1].detail == {
        "id": commands[0].command_id,
        "action": "update",
        "batch": batch_id,
    }
    assert entries[3].detail == {"index": 0, "devices": ["abc123/dev-00000", "abc123/dev-00001"]}

    # batch 1: one device was revoked meanwhile, the other one gets its update
    for command in commands:
        await reply(store, command, result={"outcome": "committed"})
    await store.revoke_device(names[2], actor="ops")
    assert await store.settle_rollout(rollout_id) == 1
    [second] = await store.start_rollout_batch(rollout_id, 1, ARGS, expires_at=clock.now + 60)
    assert second.device == names[3]
    devices = await store.rollout_devices(rollout_id)
    assert [(d.result, d.reason) for d in devices] == [
        ("committed", None),
        ("committed", None),
        ("failed", "not active"),
        ("updating", None),
    ]
    entries = list(reversed(await store.audit_entries(subject=rollout_id, limit=3)))
    assert [(e.action, e.detail.get("device")) for e in entries] == [
        ("rollout.device", "abc123/dev-00001"),
        ("rollout.device", "abc123/dev-00002"),
        ("rollout.batch", None),
    ]
    assert entries[1].detail == {
        "device": "abc123/dev-00002",
        "result": "failed",
        "reason": "not active",
    }


async def test_results_are_settled_and_too_many_failures_stop_it(
    any_store: PlatformStore, clock: FakeClock
) -> None:
    store = any_store
    names = await active_devices(store, "abc123", 7)
    rollout_id = (await rollout_of(store, names, batch_size=3, max_failures=2)).rollout_id
    first = await store.start_rollout_batch(rollout_id, 0, ARGS, expires_at=clock.now + 60)
    assert await store.settle_rollout(rollout_id) is None  # all three updating
    await reply(store, first[0], result={"outcome": "committed"})
    await reply(store, first[1], result={"outcome": "rolled_back", "reason": "health check"})
    assert await store.settle_rollout(rollout_id) is None  # one still updating
    await reply(store, first[2], result={"something": "else"})
    assert await store.settle_rollout(rollout_id) == 1  # 2 failures: not more than 2
    assert await store.settle_rollout(rollout_id) == 1  # settling again changes nothing
    second = await store.start_rollout_batch(rollout_id, 1, ARGS, expires_at=clock.now + 60)
    await reply(store, second[0], ok=False, error="disk full")
    await mark_sent(store, second[1])
    clock.advance(61)
    await expire(store)  # second[1] (sent) and second[2] (queued) expire
    assert await store.settle_rollout(rollout_id) is None
    ended = await store.get_rollout(rollout_id)
    assert (ended.state, ended.reason, ended.finished_at) == (
        "stopped",
        "5 failures, more than --max-failures 2",
        clock.now,
    )
    assert ended.counts == {"committed": 1, "failed": 5, "skipped": 1}
    assert [(d.result, d.reason) for d in await store.rollout_devices(rollout_id)] == [
        ("committed", None),
        ("failed", "rolled_back: health check"),
        ("failed", "no outcome: no reason given"),
        ("failed", "failed: disk full"),
        ("failed", "expired"),
        ("failed", "expired"),
        ("skipped", "rollout stopped"),
    ]
    [entry] = await store.audit_entries(subject=rollout_id, limit=1)
    assert (entry.action, entry.actor, entry.detail) == (
        "rollout.stopped",
        "ops",
        {"reason": "5 failures, more than --max-failures 2"},
    )
    assert await store.settle_rollout(rollout_id) is None
    assert await store.start_rollout_batch(rollout_id, 2, ARGS, expires_at=clock.now + 60) == []
    assert await store.rollouts_to_follow(limit=10) == []
    assert await store.settle_rollout("r-0000000000000000") is None


async def test_every_result_in_completes_it(any_store: PlatformStore, clock: FakeClock) -> None:
    store = any_store
    names = await active_devices(store, "abc123", 3)
    rollout_id = (await rollout_of(store, names)).rollout_id
    for batch in (0, 1):
        assert await store.settle_rollout(rollout_id) == batch
        clock.advance(1)
        for command in await store.start_rollout_batch(
            rollout_id, batch, ARGS, expires_at=clock.now + 60
        ):
            await reply(store, command, result={"outcome": "committed"})
    assert await store.settle_rollout(rollout_id) is None
    done = await store.get_rollout(rollout_id)
    assert (done.state, done.reason, done.finished_at, done.batch) == (
        "completed",
        None,
        clock.now,
        1,
    )
    assert done.counts == {"committed": 3}
    assert done.to_json()["committed"] == 3
    [entry] = await store.audit_entries(subject=rollout_id, limit=1)
    assert (entry.action, entry.detail) == ("rollout.completed", {"reason": None})


async def test_abort_cancels_queued_updates_and_still_records_delivered_ones(
    any_store: PlatformStore, clock: FakeClock
) -> None:
    store = any_store
    names = await active_devices(store, "abc123", 4)
    rollout_id = (await rollout_of(store, names)).rollout_id
    queued, sent = await store.start_rollout_batch(rollout_id, 0, ARGS, expires_at=clock.now + 60)
    await mark_sent(store, sent)
    clock.advance(5)
    aborted = await store.end_rollout(rollout_id, "aborted", "operator said so", "admin")
    assert (aborted.state, aborted.reason, aborted.finished_at) == (
        "aborted",
        "operator said so",
        clock.now,
    )
    assert aborted.counts == {"skipped": 3, "updating": 1}
    assert await store.get_rollout(rollout_id) == aborted
    cancelled = await stored(store, queued.command_id)
    assert (cancelled.state, cancelled.error, cancelled.done_at) == (
        CommandState.FAILED,
        "rollout aborted",
        clock.now,
    )
    assert (await stored(store, sent.command_id)).state is CommandState.SENT
    assert [(d.result, d.reason) for d in await store.rollout_devices(rollout_id)] == [
        ("skipped", "rollout aborted"),
        ("updating", None),
        ("skipped", "rollout aborted"),
        ("skipped", "rollout aborted"),
    ]
    [entry] = await store.audit_entries(subject=rollout_id, limit=1)
    assert (entry.action, entry.actor, entry.detail) == (
        "rollout.abort",
        "admin",
        {"reason": "operator said so"},
    )
    with pytest.raises(ConflictError) as again:
        await store.end_rollout(rollout_id, "aborted", None, "admin")
    assert str(again.value) == f"rollout {rollout_id} is already aborted"
    with pytest.raises(NotFoundError) as unknown:
        await store.end_rollout("r-0000000000000000", "aborted", None, "admin")
    assert str(unknown.value) == "no rollout r-0000000000000000"
    # the delivered update still answers: followed until its result is in, which is recorded
    assert await store.rollouts_to_follow(limit=10) == [rollout_id]
    await reply(store, sent, result={"outcome": "committed"})
    assert await store.settle_rollout(rollout_id) is None
    assert (await store.get_rollout(rollout_id)).counts == {"committed": 1, "skipped": 3}
    assert await store.rollouts_to_follow(limit=10) == []


async def test_stopped_by_the_engine_says_stopped(
    any_store: PlatformStore, clock: FakeClock
) -> None:
    store = any_store
    names = await active_devices(store, "abc123", 1)
    rollout_id = (await rollout_of(store, names)).rollout_id
    [command] = await store.start_rollout_batch(rollout_id, 0, ARGS, expires_at=clock.now + 60)
    stopped = await store.end_rollout(rollout_id, "stopped", "release web 2.0 is gone", "rollouts")
    assert (stopped.state, stopped.counts) == ("stopped", {"skipped": 1})
    assert (await stored(store, command.command_id)).error == "rollout stopped"
    [entry] = await store.audit_entries(subject=rollout_id, limit=1)
    assert (entry.action, entry.actor) == ("rollout.stopped", "rollouts")


async def test_rollouts_are_listed_newest_first_in_pages(
    any_store: PlatformStore, clock: FakeClock
) -> None:
    store = any_store
    names = await active_devices(store, "abc123", 2)
    first = await rollout_of(store, names[:1])
    clock.advance(1)
    # two at the same time: ordered by id (descending) between them
    same = sorted([await rollout_of(store, names), await rollout_of(store, names[1:])],
                  key=lambda r: r.rollout_id, reverse=True)  # fmt: skip
    newest_first = [*same, first]
    assert await store.list_rollouts() == newest_first
    page = await store.list_rollouts(limit=2)
    assert page == newest_first[:2]
    assert await store.list_rollouts(limit=2, before=page[-1].rollout_id) == [first]
    assert await store.list_rollouts(before=first.rollout_id) == []
    assert await store.list_rollouts(before="r-0000000000000000") == []
    # followed oldest first, as many as asked for
    oldest_first = [r.rollout_id for r in reversed(newest_first)]
    assert await store.rollouts_to_follow(limit=10) == oldest_first
    assert await store.rollouts_to_follow(limit=2) == oldest_first[:2]
    await store.end_rollout(first.rollout_id, "aborted", None, "admin")
    assert await store.rollouts_to_follow(limit=10) == oldest_first[1:]
    listed = await store.list_rollouts(limit=3)
    assert (listed[-1].state, listed[-1].counts) == ("aborted", {"skipped": 1})


# -- PostgreSQL only: two processes on one database ---------------------------------------------


async def two_stores(url: str, clock: FakeClock) -> tuple[PostgresStore, PostgresStore]:
    one, two = await asyncio.gather(
        PostgresStore.open(url, clock=clock), PostgresStore.open(url, clock=clock)
    )
    return one, two


async def test_two_stores_starting_one_batch_at_once_start_it_once(
    postgres_url: str, clock: FakeClock
) -> None:
    """Ten rollouts, each started by both stores at the same moment: each batch is started by
    exactly one of them, and each device has one update command."""
    one, two = await two_stores(postgres_url, clock)
    try:
        names = await active_devices(one, "abc123", 4)
        ids = [(await rollout_of(one, names, batch_size=4)).rollout_id for _ in range(10)]
        results = await asyncio.gather(
            *(
                store.start_rollout_batch(rollout_id, 0, ARGS, expires_at=clock.now + 60)
                for rollout_id in ids
                for store in (one, two)
            )
        )
        for rollout_id, pair in zip(
            ids, zip(results[::2], results[1::2], strict=True), strict=True
        ):
            assert sorted(len(started) for started in pair) == [0, 4], rollout_id
        conn = await asyncpg.connect(postgres_url, timeout=10)
        try:
            per_device = await conn.fetch(
                "SELECT customer_id, device_id, count(*) FROM commands GROUP BY 1, 2"
            )
            batches = await conn.fetchval(
                "SELECT count(*) FROM audit_log WHERE action = 'rollout.batch'"
            )
        finally:
            await conn.close()
        assert sorted((r[0], r[1], r[2]) for r in per_device) == [(*name, 10) for name in names]
        assert batches == 10
    finally:
        await one.close()
        await two.close()


async def test_two_engines_on_one_database_update_each_device_once(
    postgres_url: str, clock: FakeClock
) -> None:
    """Two rollout engines, each over its own store (pool), tick at the same moments until the
    rollout completes: each batch starts once, each result is recorded once."""
    one, two = await two_stores(postgres_url, clock)
    settings = RolloutSettings()
    engines = [RolloutEngine(store, settings, clock=clock) for store in (one, two)]
    try:
        names = await active_devices(one, "abc123", 6)
        rollout_id = (await rollout_of(one, names, batch_size=2)).rollout_id
        for _ in range(20):
            await asyncio.gather(*(engine.tick() for engine in engines))
            rollout = await one.get_rollout(rollout_id)
            assert rollout is not None
            if not rollout.running:
                break
            for device in await one.rollout_devices(rollout_id):
                if device.result == "updating":
                    command = await stored(one, device.command_id)
                    if command is not None and command.state is CommandState.QUEUED:
                        await reply(two, command, result={"outcome": "committed"})
        assert (rollout.state, rollout.counts) == ("completed", {"committed": 6})
        conn = await asyncpg.connect(postgres_url, timeout=10)
        try:
            updates = await conn.fetchval("SELECT count(*) FROM commands")
            actions = await conn.fetch(
                "SELECT action, count(*) FROM audit_log WHERE subject = $1 GROUP BY action"
                " ORDER BY action",
                rollout_id,
            )
        finally:
            await conn.close()
        assert updates == 6
        assert [tuple(r) for r in actions] == [
            ("rollout.batch", 3),
            ("rollout.completed", 1),
            ("rollout.device", 6),
            ("rollout.start", 1),
        ]
        assert sum(engine.batches_started for engine in engines) >= 3
    finally:
        await one.close()
        await two.close()


async def test_a_batch_waits_for_a_revoke_in_progress_and_leaves_that_device_out(
    postgres_url: str, clock: FakeClock
) -> None:
    """A device's revoke not yet committed when its batch starts: the batch waits for it (the
    device's row is locked), then fails that device as not active; no update command for it."""
    store = await PostgresStore.open(postgres_url, clock=clock)
    conn = await asyncpg.connect(postgres_url, timeout=10)
    try:
        names = await active_devices(store, "abc123", 2)
        rollout_id = (await rollout_of(store, names)).rollout_id
        revoke = conn.transaction()
        await revoke.start()
        await conn.execute(
            "UPDATE devices SET state = 'revoked' WHERE customer_id = $1 AND device_id = $2",
            *names[1],
        )
        start = asyncio.create_task(
            store.start_rollout_batch(rollout_id, 0, ARGS, expires_at=clock.now + 60)
        )

        async def batch_waits() -> bool:
            waiting = await store._read(
                lambda other: other.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database()"
                )
            )
            return bool(waiting)

        await wait_until(batch_waits, 10.0)
        assert not start.done()
        await revoke.commit()
        [command] = await asyncio.wait_for(start, 10)
        assert command.device == names[0]
        devices = await store.rollout_devices(rollout_id)
        assert [(d.result, d.reason) for d in devices] == [
            ("updating", None),
            ("failed", "not active"),
        ]
        assert await conn.fetchval("SELECT count(*) FROM commands") == 1
    finally:
        await conn.close()
        await store.close()


async def test_an_abort_racing_a_dispatcher_leaves_every_device_consistent(
    postgres_url: str, clock: FakeClock
) -> None:
    """One store aborts while the other marks the batch's commands sent (each locks them in
    command id order: no deadlock). Each device ends either skipped with its command cancelled,
    or still updating with its command sent: never skipped with a sent command. (With the
    abort locking in the opposite order, this deadlocked in one run of two.)"""
    one, two = await two_stores(postgres_url, clock)
    try:
        names = await active_devices(one, "abc123", 40)
        for _ in range(20):
            rollout_id = (await rollout_of(one, names, batch_size=40)).rollout_id
            commands = await one.start_rollout_batch(rollout_id, 0, ARGS, expires_at=clock.now + 60)
            ids = [c.command_id for c in commands]
            await asyncio.gather(
                one.end_rollout(rollout_id, "aborted", None, "admin"),
                two.mark_sent(reversed(ids), clock.now),
            )
            by_id = {c.command_id: await one.get_command(c.command_id) for c in commands}
            for device in await one.rollout_devices(rollout_id):
                command = by_id[device.command_id]
                assert command is not None
                if device.result == "skipped":
                    assert (command.state, command.error) == (
                        CommandState.FAILED,
                        "rollout aborted",
                    )
                else:
                    assert (device.result, command.state) == ("updating", CommandState.SENT)
    finally:
        await one.close()
        await two.close()
