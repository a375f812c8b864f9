"""The outbox: bounded, ordered, persistent, acknowledged by id."""

from __future__ import annotations

import asyncio
from pathlib import Path

from iotbiz.agent.outbox import Message, Outbox


def message(i: int) -> Message:
    return Message("devices/a/b/telemetry", f'{{"seq": {i}}}'.encode())


def queued(outbox: Outbox) -> list[Message]:
    return [entry.message for entry in outbox.head(100)]


async def test_messages_survive_a_restart_in_order(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, 10)
    await outbox.load()
    for i in range(5):
        await outbox.put(message(i))
    await outbox.done([entry.id for entry in outbox.head(2)])
    again = Outbox(tmp_path, 10)
    await again.load()
    assert queued(again) == [message(i) for i in range(2, 5)]
    assert again.available.is_set()
    await again.done([entry.id for entry in again.head(3)])
    assert not again.available.is_set()
    assert len(again) == 0


async def test_the_oldest_are_dropped_and_counted(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, 3)
    await outbox.load()
    for i in range(7):
        await outbox.put(message(i))
    assert queued(outbox) == [message(i) for i in range(4, 7)]
    assert outbox.dropped == 4
    again = Outbox(tmp_path, 3)
    await again.load()
    assert (again.dropped, queued(again)) == (4, [message(i) for i in range(4, 7)])


async def test_a_damaged_line_is_skipped(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, 10)
    await outbox.load()
    await outbox.put(message(1))
    with (tmp_path / "outbox.jsonl").open("ab") as stream:
        stream.write(b'{"topic": "x", "payl')  # torn by a power cut
    again = Outbox(tmp_path, 10)
    await again.load()
    assert queued(again) == [message(1)]


async def test_a_message_put_while_the_head_is_sent_is_kept(tmp_path: Path) -> None:
    """Issue 8 fault 4: sent [0, 1, 2], 3 put meanwhile (dropping 0): 3 must stay queued."""
    outbox = Outbox(tmp_path, 3)
    await outbox.load()
    for i in range(3):
        await outbox.put(message(i))
    sending = outbox.head(10)
    await outbox.put(message(3))  # while the sender publishes; the full queue drops 0
    await outbox.done([entry.id for entry in sending])
    assert queued(outbox) == [message(3)]
    assert outbox.dropped == 1
    again = Outbox(tmp_path, 3)
    await again.load()
    assert queued(again) == [message(3)]


async def test_concurrent_puts_during_sends_lose_nothing(tmp_path: Path) -> None:
    """A sender that acknowledges what it took while producers keep putting: every message is
    either sent or counted as dropped, and ids go on growing across a restart."""
    outbox = Outbox(tmp_path, 5)
    await outbox.load()
    sent: list[Message] = []

    async def produce() -> None:
        for i in range(200):
            await outbox.put(message(i))

    async def send() -> None:
        while len(sent) + outbox.dropped < 200:
            await outbox.available.wait()
            batch = outbox.head(3)
            await asyncio.sleep(0)  # "publishing": the producer runs meanwhile
            sent.extend(entry.message for entry in batch)
            await outbox.done([entry.id for entry in batch])

    await asyncio.wait_for(asyncio.gather(produce(), send()), 30)
    seqs = [int(m.payload.decode()[8:-1]) for m in sent]
    assert seqs == sorted(set(seqs))  # in order, never twice
    assert len(seqs) + outbox.dropped == 200
    assert seqs[-1] == 199
    await outbox.put(message(1000))
    again = Outbox(tmp_path, 5)
    await again.load()
    await again.put(message(1001))
    ids = [entry.id for entry in again.head(5)]
    assert ids == sorted(ids)
    assert ids[-1] > 200  # numbering continues after a restart


async def test_ids_are_kept_on_disk(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, 10)
    await outbox.load()
    for i in range(3):
        await outbox.put(message(i))
    ids = [entry.id for entry in outbox.head(3)]
    again = Outbox(tmp_path, 10)
    await again.load()
    assert [entry.id for entry in again.head(3)] == ids
    await again.done(ids[1:2])  # acknowledged out of order: only that one leaves
    assert queued(again) == [message(0), message(2)]


async def test_a_message_that_can_never_fit_is_dropped_and_counted(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, 10, max_message_bytes=1024)
    await outbox.load()
    await outbox.put(Message("devices/a/b/reply", b"x" * 2000))
    await outbox.put(message(1))
    assert queued(outbox) == [message(1)]
    assert outbox.dropped == 1
