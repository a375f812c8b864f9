"""LeanSession keeps the rules of amqtt's per-session state machine; LeanQueue those of the
asyncio.Queue methods amqtt uses."""

from __future__ import annotations

import asyncio

import pytest
from amqtt.session import Session
from hypothesis import given
from hypothesis import strategies as st
from transitions import MachineError

from iotbiz.broker.sessions import LeanQueue, LeanSession


def apply(session: Session, trigger: str) -> tuple[str, bool]:
    try:
        getattr(session.transitions, trigger)()
    except MachineError:
        return session.transitions.state, False
    return session.transitions.state, True


@given(st.lists(st.sampled_from(["connect", "disconnect"]), max_size=12))
def test_lean_states_follow_amqtts_machine(triggers: list[str]) -> None:
    amqtt_session, lean = Session(), LeanSession()
    assert lean.transitions.state == amqtt_session.transitions.state == "new"
    for trigger in triggers:
        assert apply(lean, trigger) == apply(amqtt_session, trigger)
        for state in ("new", "connected", "disconnected"):
            check = f"is_{state}"
            assert getattr(lean.transitions, check)() == getattr(amqtt_session.transitions, check)()
        # the same enter callbacks ran (their values are whole seconds of the wall clock)
        for stamp in ("last_connect_time", "last_disconnect_time"):
            assert (getattr(lean, stamp) is None) == (getattr(amqtt_session, stamp) is None)


async def test_lean_queue_is_a_fifo_that_waits_for_items() -> None:
    queue: LeanQueue[int] = LeanQueue()
    assert queue.empty()
    assert queue.qsize() == 0
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()
    await queue.put(1)
    queue.put_nowait(2)
    assert (queue.qsize(), queue.items()) == (2, [1, 2])
    assert [await queue.get(), queue.get_nowait()] == [1, 2]
    assert queue.empty()

    first, second = asyncio.ensure_future(queue.get()), asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait(3)
    queue.put_nowait(4)
    assert await asyncio.wait_for(asyncio.gather(first, second), 1) == [3, 4]


async def test_a_cancelled_getter_loses_no_item() -> None:
    queue: LeanQueue[str] = LeanQueue()
    cancelled, waiting = asyncio.ensure_future(queue.get()), asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait("item")  # wakes `cancelled` first ...
    cancelled.cancel()  # ... which gives up before it runs: `waiting` gets the item
    assert await asyncio.wait_for(waiting, 1) == "item"
    assert cancelled.cancelled()
    assert queue.empty()
