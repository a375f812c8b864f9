"""The store's command life cycle: create, list with paging, due, sent, finished by THAT
device only, expired, final states never change, revoke/reset fail open commands."""

from __future__ import annotations

import pytest

from iotbiz.errors import NotFoundError
from iotbiz.models import CommandReply, CommandState, PresenceUpdate
from iotbiz.names import DeviceName
from iotbiz.store import Store
from tests.conftest import FakeClock
from tests.store_helpers import active_devices


async def test_create_refuses_devices_that_are_not_active(store: Store) -> None:
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


async def test_create_get_and_audit(store: Store, clock: FakeClock) -> None:
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


async def test_list_newest_first_with_keyset_paging_and_filters(
    store: Store, clock: FakeClock
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


async def test_due_sent_and_dispatchable(store: Store, clock: FakeClock) -> None:
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
    store: Store, clock: FakeClock
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


async def test_expiry_and_late_replies(store: Store, clock: FakeClock) -> None:
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


async def test_expiry_is_bounded(store: Store, clock: FakeClock) -> None:
    names = await active_devices(store, "abc123", 30)
    await store.create_commands(
        names, "ping", {}, expires_at=clock.now + 1, actor="op", batch_id="b"
    )
    clock.advance(2)
    assert len(await store.expire_commands(limit=12)) == 12
    assert len(await store.expire_commands(limit=12)) == 12
    assert len(await store.expire_commands(limit=12)) == 6


async def test_revoke_and_reset_fail_open_commands(store: Store, clock: FakeClock) -> None:
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


async def test_prune_commands_deletes_only_old_final_ones(store: Store, clock: FakeClock) -> None:
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


async def test_commands_counted_by_state(store: Store, clock: FakeClock) -> None:
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
