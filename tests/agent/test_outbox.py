"""The outbox: bounded, ordered, persistent."""

from __future__ import annotations

from pathlib import Path

from iotbiz.agent.outbox import Message, Outbox


def message(i: int) -> Message:
    return Message("devices/a/b/telemetry", f'{{"seq": {i}}}'.encode())


async def test_messages_survive_a_restart_in_order(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, 10)
    await outbox.load()
    for i in range(5):
        await outbox.put(message(i))
    await outbox.done(2)
    again = Outbox(tmp_path, 10)
    await again.load()
    assert again.head(10) == [message(i) for i in range(2, 5)]
    assert again.available.is_set()
    await again.done(3)
    assert not again.available.is_set()
    assert len(again) == 0


async def test_the_oldest_are_dropped_and_counted(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, 3)
    await outbox.load()
    for i in range(7):
        await outbox.put(message(i))
    assert outbox.head(10) == [message(i) for i in range(4, 7)]
    assert outbox.dropped == 4
    again = Outbox(tmp_path, 3)
    await again.load()
    assert (again.dropped, again.head(10)) == (4, [message(i) for i in range(4, 7)])


async def test_a_damaged_line_is_skipped(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, 10)
    await outbox.load()
    await outbox.put(message(1))
    with (tmp_path / "outbox.jsonl").open("ab") as stream:
        stream.write(b'{"topic": "x", "payl')  # torn by a power cut
    again = Outbox(tmp_path, 10)
    await again.load()
    assert again.head(10) == [message(1)]
