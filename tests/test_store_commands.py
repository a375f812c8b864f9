"""The store's command life cycle: create, list with paging, due, sent, finished by THAT
device only, expired, final states never change, revoke/reset fail open commands; on both
backends. On PostgreSQL, several processes (here: separate connection pools on one database)
never take, finish or expire one command twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest
import pytest_asyncio

from iotbiz.errors import NotFoundError
from iotbiz.models import Command, CommandReply, CommandState, PresenceUpdate
from iotbiz.names import DeviceName
from iotbiz.store.interface import PlatformStore
from iotbiz.store.postgres import PostgresStore
from iotbiz.store.postgres.commands import DUE_TAKEN_S
from tests.conftest import FakeClock
from tests.store_helpers import active_devices


@pytest.fixture
def store(any_store: PlatformStore) -> PlatformStore:
    """Every test here runs on both backends (SQLite, PostgreSQL)."""
    return any_store


async def test_create_refuses_devices_that_are_not_active(store: PlatformStore) -> None:
    [a, b] = await active_devices(store, "abc123", 2)
    await store.revoke_device(b, actor="test")
    ghost = DeviceName("abc123", "ghost")
    with pytest.raises(
        NotFoundError, match=r"not active devices \(2\): abc123/dev-00001, abc123/ghost"
    ):
        await store.create_commands(
            [a, b, ghost], "ping", {}, expires_at=1e12, actor="op", batch_id="b-1"
        )
    assert await store.list_commands() == []  # nothing created


async def test_create_get_and_audit(store: PlatformStore, clock: FakeClock) -> None:
    [a, b] = await active_devices(store, "abc123", 2)
    commands = await store.create_commands(
        [a, b, a],
        "app.restart",
        {"name": "web"},
        expires_at=clock.now + 60,
        actor="op",
        batch_id="b-1",
    )
    assert [c.name for c in commands] == ["abc123/dev-00000", "abc123/dev-00001"]  # a once
    assert all(c.command_id.startswith("c-") and len(c.command_id) == 18 for c in commands)
    got = await store.get_command(commands[0].command_id)
    assert got == commands[0]
    assert got.state is CommandState.QUEUED
    assert got.to_json()["device"] == "abc123/dev-00000"
    assert await store.get_command("c-nothing") is None
    [entry] = await store.audit_entries(subject=str(a), limit=1)
    assert (entry.action, entry.actor, entry.detail["id"]) == ("command.send", "op", got.command_id)
    # one entry per command, in the order of the names (newest first here)
    assert [e.detail["id"] for e in await store.audit_entries(limit=2)] == [
        commands[1].command_id,
        commands[0].command_id,
    ]


async def test_list_newest_first_with_keyset_paging_and_filters(
    store: PlatformStore, clock: FakeClock
) -> None:
    [a, b] = await active_devices(store, "abc123", 2)
    ids = []
    for i in range(5):
        clock.advance(1)
        [c] = await store.create_commands(
            [a if i % 2 == 0 else b],
            "ping",
            {},
            expires_at=clock.now + 60,
            actor="op",
            batch_id=f"b-{i % 2}",
        )
        ids.append(c.command_id)
    page = await store.list_commands(limit=2)
    assert [c.command_id for c in page] == [ids[4], ids[3]]
    page = await store.list_commands(limit=2, before=page[-1].command_id)
    assert [c.command_id for c in page] == [ids[2], ids[1]]
    page = await store.list_commands(limit=2, before=page[-1].command_id)
    assert [c.command_id for c in page] == [ids[0]]
    assert [c.command_id for c in await store.list_commands(name=b)] == [ids[3], ids[1]]
    assert [c.command_id for c in await store.list_commands(batch_id="b-0")] == [
        ids[4],
        ids[2],
        ids[0],
    ]
    await store.mark_sent([ids[0]], clock.now)
    assert [c.command_id for c in await store.list_commands(state=CommandState.SENT)] == [ids[0]]
    assert await store.list_commands(before="c-unknown") == []


async def test_due_sent_and_dispatchable(store: PlatformStore, clock: FakeClock) -> None:
    [a, b] = await active_devices(store, "abc123", 2)
    [c1] = await store.create_commands(
        [a], "ping", {}, expires_at=clock.now + 60, actor="op", batch_id="b"
    )
    clock.advance(1)
    [c2] = await store.create_commands(
        [a], "status", {}, expires_at=clock.now + 5, actor="op", batch_id="b"
    )
    [c3] = await store.create_commands(
        [b], "ping", {}, expires_at=clock.now + 60, actor="op", batch_id="b"
    )
    assert [c.command_id for c in await store.due_commands([a])] == [c1.command_id, c2.command_id]
    # nobody is online: nothing to dispatch
    assert await store.dispatchable_commands(resend_before=clock.now, limit=10) == []
    await store.record_presence([PresenceUpdate(a, clock.now, online=True)])
    found = await store.dispatchable_commands(resend_before=clock.now - 30, limit=10)
    assert [c.command_id for c in found] == [c2.command_id, c1.command_id]  # soonest expiry first
    await store.mark_sent([c1.command_id, c2.command_id], clock.now)
    assert await store.dispatchable_commands(resend_before=clock.now - 30, limit=10) == []
    clock.advance(31)  # c2 expired meanwhile; c1 sent 31 s ago without a reply: again
    found = await store.dispatchable_commands(resend_before=clock.now - 30, limit=10)
    assert [c.command_id for c in found] == [c1.command_id]
    assert [c.command_id for c in await store.due_commands([a, b])] == [
        c1.command_id,
        c3.command_id,
    ]
    assert (await store.get_command(c1.command_id)).state is CommandState.SENT


async def test_a_reply_finishes_only_that_devices_open_command(
    store: PlatformStore, clock: FakeClock
) -> None:
    [a, b] = await active_devices(store, "abc123", 2)
    [ca] = await store.create_commands(
        [a], "ping", {}, expires_at=clock.now + 60, actor="op", batch_id="b"
    )
    [cb] = await store.create_commands(
        [b], "ping", {}, expires_at=clock.now + 60, actor="op", batch_id="b"
    )
    # b answers with a's id: ignored
    assert (
        await store.finish_command(b, ca.command_id, ok=True, result={"pong": True}, error=None)
        is None
    )
    assert (await store.get_command(ca.command_id)).state is CommandState.QUEUED
    clock.advance(2)
    done, failed, unknown = await store.finish_commands(
        [
            CommandReply(a, ca.command_id, ok=True, result={"pong": True}),
            CommandReply(b, cb.command_id, ok=False, error="no app named 'x'"),
            CommandReply(a, "c-unknown", ok=True),
        ]
    )
    assert unknown is None
    assert (done.state, done.result, done.done_at) == (CommandState.DONE, {"pong": True}, clock.now)
    assert (failed.state, failed.error) == (CommandState.FAILED, "no app named 'x'")
    # final: a second reply changes nothing
    assert await store.finish_command(a, ca.command_id, ok=False, result=None, error="late") is None
    assert (await store.get_command(ca.command_id)).state is CommandState.DONE
    await store.mark_sent([ca.command_id], clock.now)  # a late mark_sent cannot reopen it
    assert (await store.get_command(ca.command_id)).state is CommandState.DONE


async def test_expiry_and_late_replies(store: PlatformStore, clock: FakeClock) -> None:
    [a] = await active_devices(store, "abc123", 1)
    [
        c1,
    ] = await store.create_commands(
        [a], "ping", {}, expires_at=clock.now + 10, actor="op", batch_id="b"
    )
    [c2] = await store.create_commands(
        [a], "ping", {}, expires_at=clock.now + 10, actor="op", batch_id="b"
    )
    [c3] = await store.create_commands(
        [a], "ping", {}, expires_at=clock.now + 10, actor="op", batch_id="b"
    )
    [c4] = await store.create_commands(
        [a], "ping", {}, expires_at=clock.now + 100, actor="op", batch_id="b"
    )
    clock.advance(11)
    # the agent's "expired before it arrived" after expires_at, before the sweeper: expired
    late = await store.finish_command(
        a, c2.command_id, ok=False, result=None, error="command expired before it arrived"
    )
    assert (late.state, late.error) == (CommandState.EXPIRED, "command expired before it arrived")
    # a success after expires_at: the device did it
    assert (
        await store.finish_command(a, c3.command_id, ok=True, result=1, error=None)
    ).state is CommandState.DONE
    expired = await store.expire_commands(limit=10)
    assert [c.command_id for c in expired] == [c1.command_id]
    assert expired[0].state is CommandState.EXPIRED
    assert await store.expire_commands(limit=10) == []
    # an expired command stays expired whatever the device says later
    assert await store.finish_command(a, c1.command_id, ok=True, result=1, error=None) is None
    assert (await store.get_command(c1.command_id)).state is CommandState.EXPIRED
    assert (await store.get_command(c4.command_id)).state is CommandState.QUEUED
    assert await store.due_commands([a]) == [await store.get_command(c4.command_id)]


async def test_expiry_is_bounded(store: PlatformStore, clock: FakeClock) -> None:
    names = await active_devices(store, "abc123", 30)
    await store.create_commands(
        names, "ping", {}, expires_at=clock.now + 1, actor="op", batch_id="b"
    )
    clock.advance(2)
    assert len(await store.expire_commands(limit=12)) == 12
    assert len(await store.expire_commands(limit=12)) == 12
    assert len(await store.expire_commands(limit=12)) == 6


async def test_revoke_and_reset_fail_open_commands(store: PlatformStore, clock: FakeClock) -> None:
    [a, b] = await active_devices(store, "abc123", 2)
    [ca] = await store.create_commands(
        [a], "ping", {}, expires_at=clock.now + 60, actor="op", batch_id="b"
    )
    [cb] = await store.create_commands(
        [b], "ping", {}, expires_at=clock.now + 60, actor="op", batch_id="b"
    )
    await store.revoke_device(a, actor="op")
    await store.reset_device(b, actor="op")
    got_a, got_b = await store.get_command(ca.command_id), await store.get_command(cb.command_id)
    assert (got_a.state, got_a.error) == (CommandState.FAILED, "device revoked")
    assert (got_b.state, got_b.error) == (CommandState.FAILED, "device reset")


async def test_prune_commands_deletes_only_old_final_ones(
    store: PlatformStore, clock: FakeClock
) -> None:
    [a] = await active_devices(store, "abc123", 1)
    [old] = await store.create_commands(
        [a], "ping", {}, expires_at=clock.now + 1, actor="op", batch_id="b"
    )
    [still_open] = await store.create_commands(
        [a], "ping", {}, expires_at=clock.now + 1e6, actor="op", batch_id="b"
    )
    clock.advance(5)
    await store.expire_commands()
    assert await store.prune_commands(before=clock.now, limit=10) == 1
    assert await store.get_command(old.command_id) is None
    assert await store.get_command(still_open.command_id) is not None


async def test_commands_counted_by_state(store: PlatformStore, clock: FakeClock) -> None:
    assert await store.count_commands() == dict.fromkeys(CommandState, 0)
    [a, b] = await active_devices(store, "abc123", 2)
    [ca, _cb] = await store.create_commands(
        [a, b], "ping", {}, expires_at=clock.now + 60, actor="op", batch_id="b-1"
    )
    await store.finish_command(a, ca.command_id, ok=False, result=None, error="busy")
    counts = await store.count_commands()
    assert counts[CommandState.QUEUED] == 1
    assert counts[CommandState.FAILED] == 1
    assert sum(counts.values()) == 2


async def test_text_a_backend_cannot_store_fails_no_batch_of_replies(
    store: PlatformStore, clock: FakeClock
) -> None:
    """NUL (PostgreSQL text cannot hold it) and lone surrogates (JSON may carry "\\ud800";
    they have no UTF-8 form) from a device: its id matches nothing, its error keeps U+FFFD
    in their place, the rest of the batch is applied, on both backends alike."""
    [a] = await active_devices(store, "abc123", 1)
    [c1, c2, c3] = [
        (
            await store.create_commands(
                [a], "ping", {}, expires_at=clock.now + 60, actor="op", batch_id="b"
            )
        )[0]
        for _ in range(3)
    ]
    nul_id, surrogate_id, failed, failed_too, done = await store.finish_commands(
        [
            CommandReply(a, "c-\x00", ok=True),
            CommandReply(a, "c-\ud800", ok=True),
            CommandReply(a, c1.command_id, ok=False, error="bad\x00byte"),
            CommandReply(a, c2.command_id, ok=False, error="half \ud83d pair"),
            CommandReply(a, c3.command_id, ok=True, result={"text": "nul\x00 \udc00"}),
        ]
    )
    assert (nul_id, surrogate_id) == (None, None)
    assert failed is not None
    assert failed.error == "bad\ufffdbyte"
    assert failed_too is not None
    assert failed_too.error == "half \ufffd pair"
    assert done is not None
    assert done.result == {"text": "nul\x00 \udc00"}  # JSON escapes them
    assert await store.get_command(c2.command_id) == failed_too
    # an operator's NUL (an admin API path or query) finds nothing, fails nothing
    assert await store.get_command("c-\x00") is None
    assert await store.list_commands(before="c-\x00") == []
    assert await store.list_commands(batch_id="b\x00") == []
    await store.mark_sent(["c-\x00"], clock.now)


# -- PostgreSQL only: processes sharing the database ---------------------------------------------


@pytest_asyncio.fixture
async def two_stores(
    postgres_url: str, clock: FakeClock
) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two stores with their own pools on one database, as two platform processes have."""
    one, two = await asyncio.gather(
        PostgresStore.open(postgres_url, clock=clock), PostgresStore.open(postgres_url, clock=clock)
    )
    yield one, two
    await one.close()
    await two.close()


async def queued_for_online_devices(
    store: PostgresStore, clock: FakeClock, devices: int, per_device: int
) -> tuple[list[DeviceName], set[str]]:
    names = await active_devices(store, "abc123", devices)
    await store.record_presence([PresenceUpdate(n, clock.now, online=True) for n in names])
    ids: set[str] = set()
    for i in range(per_device):
        commands = await store.create_commands(
            names, "ping", {}, expires_at=clock.now + 100 + i, actor="op", batch_id=f"b-{i}"
        )
        ids |= {c.command_id for c in commands}
    return names, ids


async def run_together(*takers: Callable[[], Awaitable[list[str]]]) -> list[list[str]]:
    return list(await asyncio.gather(*(taker() for taker in takers)))


def assert_taken_once(taken: list[list[str]], expected: set[str]) -> None:
    everything = [command_id for ids in taken for command_id in ids]
    assert len(everything) == len(set(everything)), "a command was taken twice"
    assert set(everything) == expected


async def test_two_processes_scanning_never_take_the_same_command(
    two_stores: tuple[PostgresStore, PostgresStore], clock: FakeClock
) -> None:
    one, two = two_stores
    _, ids = await queued_for_online_devices(one, clock, 30, 4)

    def dispatcher(store: PostgresStore) -> Callable[[], Awaitable[list[str]]]:
        async def run() -> list[str]:
            taken: list[str] = []
            while batch := await store.dispatchable_commands(resend_before=clock.now - 30, limit=7):
                taken += [c.command_id for c in batch]
                await store.mark_sent([c.command_id for c in batch], clock.now)
            return taken

        return run

    # three dispatchers per process: their transactions overlap on the server
    taken = await run_together(*(dispatcher(store) for store in (one, two) * 3))
    assert_taken_once(taken, ids)
    assert all(len(t) < len(ids) for t in taken)  # the work was shared
    # taken and sent: nothing more until resend_before passes, then each once again
    assert await one.dispatchable_commands(resend_before=clock.now - 30, limit=500) == []
    clock.advance(31)
    taken = await run_together(*(dispatcher(store) for store in (one, two) * 3))
    assert_taken_once(taken, ids)


async def test_two_processes_seeing_devices_come_online_never_take_the_same_command(
    two_stores: tuple[PostgresStore, PostgresStore], clock: FakeClock
) -> None:
    one, two = two_stores
    names, ids = await queued_for_online_devices(one, clock, 30, 3)

    def due(store: PostgresStore, part: list[DeviceName]) -> Callable[[], Awaitable[list[str]]]:
        async def run() -> list[str]:
            return [c.command_id for c in await store.due_commands(part)]

        return run

    # every process asks for every device, in overlapping parts
    parts = [names, names[:15], names[10:], names[::-1]]
    taken = await run_together(*(due(store, part) for store in (one, two) for part in parts))
    assert_taken_once(taken, ids)
    assert await two.due_commands(names) == []
    clock.advance(DUE_TAKEN_S)  # the next time the devices come online: each once again
    taken = await run_together(*(due(store, part) for store in (one, two) for part in parts))
    assert_taken_once(taken, ids)


async def test_a_taken_command_whose_publish_failed_is_taken_again_after_resend_after(
    two_stores: tuple[PostgresStore, PostgresStore], clock: FakeClock
) -> None:
    one, two = two_stores
    await queued_for_online_devices(one, clock, 1, 1)
    [command] = await one.dispatchable_commands(resend_before=clock.now - 30, limit=10)
    assert command.state is CommandState.QUEUED  # as it was: the same Command as on SQLite
    assert await one.get_command(command.command_id) == command
    # never marked sent (the broker did not take it): no other scan takes it meanwhile
    assert await two.dispatchable_commands(resend_before=clock.now - 30, limit=10) == []
    clock.advance(31)
    [again] = await two.dispatchable_commands(resend_before=clock.now - 30, limit=10)
    assert again == command


async def test_two_processes_applying_the_same_replies_finish_each_command_once(
    two_stores: tuple[PostgresStore, PostgresStore], clock: FakeClock
) -> None:
    one, two = two_stores
    names = await active_devices(one, "abc123", 40)
    commands = await one.create_commands(
        names, "ping", {}, expires_at=clock.now + 60, actor="op", batch_id="b"
    )
    replies = [
        CommandReply(c.device, c.command_id, ok=True, result={"n": i})
        for i, c in enumerate(commands)
    ]

    async def apply(store: PostgresStore, order: list[CommandReply]) -> list[Command | None]:
        return await store.finish_commands(order)

    first, second = await asyncio.gather(apply(one, replies), apply(two, replies[::-1]))
    second = second[::-1]
    for command, a, b in zip(commands, first, second, strict=True):
        assert (a is None) != (b is None), command.command_id
        finished = a or b
        assert finished is not None
        assert (finished.state, finished.result) == (
            CommandState.DONE,
            {"n": commands.index(command)},
        )


async def test_two_processes_expiring_expire_each_command_once(
    two_stores: tuple[PostgresStore, PostgresStore], clock: FakeClock
) -> None:
    one, two = two_stores
    names = await active_devices(one, "abc123", 50)
    commands = await one.create_commands(
        names, "ping", {}, expires_at=clock.now + 1, actor="op", batch_id="b"
    )
    clock.advance(2)

    def sweeper(store: PostgresStore) -> Callable[[], Awaitable[list[str]]]:
        async def run() -> list[str]:
            expired: list[str] = []
            while batch := await store.expire_commands(limit=6):
                expired += [c.command_id for c in batch]
            return expired

        return run

    taken = await run_together(*(sweeper(store) for store in (one, two) * 2))
    assert_taken_once(taken, {c.command_id for c in commands})


async def test_a_reset_waiting_for_commands_being_created_fails_them_too(
    postgres_url: str, clock: FakeClock
) -> None:
    """Another process creating commands for the device holds its row (FOR SHARE) until it
    commits; a reset meanwhile waits for it and then fails those commands with the others,
    never leaving a queued command for a device that is gone (its id may register again)."""
    store = await PostgresStore.open(postgres_url, clock=clock)
    other = await asyncpg.connect(postgres_url, timeout=10)
    try:
        [name] = await active_devices(store, "abc123", 1)
        creating = other.transaction()
        await creating.start()
        await other.execute(
            "SELECT 1 FROM devices WHERE customer_id = $1 AND device_id = $2 FOR SHARE", *name
        )
        await other.execute(
            "INSERT INTO commands (command_id, customer_id, device_id, batch_id, action, state,"
            " created_at, expires_at, actor) VALUES ('c-1', $1, $2, 'b-1', 'ping', 'queued',"
            " 0, 1e12, 'test')",
            *name,
        )
        reset = asyncio.create_task(store.reset_device(name, actor="test"))

        async def reset_waits() -> bool:
            waiting = await other.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            return bool(waiting)

        for _ in range(500):
            if await reset_waits():
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the reset did not wait for the device's row")
        await creating.commit()
        await asyncio.wait_for(reset, 30)
        assert await store.get_device(name) is None
        command = await store.get_command("c-1")
        assert command is not None
        assert (command.state, command.error) == (CommandState.FAILED, "device reset")
    finally:
        await other.close()
        await store.close()
