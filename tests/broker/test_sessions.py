"""LeanSession's state keeps the rules of the transitions.Machine amqtt gives every Session."""

from __future__ import annotations

from amqtt.session import Session
from hypothesis import given
from hypothesis import strategies as st
from transitions import MachineError

from iotbiz.broker.sessions import LeanSession


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
