"""The private RabbitMQ the tests start: a port taken between its choice and the node's bind
(another process, or a port handed to two nodes) boots the node again on new ports instead of
failing the test module (a CI run lost its cluster tests to `eaddrinuse` this way)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.services import rabbitmq

pytestmark = pytest.mark.timeout(400)


def test_free_port_never_hands_out_a_port_twice() -> None:
    ports = [rabbitmq.free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)


def test_a_node_whose_port_is_taken_boots_again_on_new_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = rabbitmq.free_port
    picked: list[int] = []
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        held = taken.getsockname()[1]

        def first_one_taken() -> int:
            port = held if len(picked) == 1 else real()  # the second: the node's MQTT port
            picked.append(port)
            return port

        monkeypatch.setattr(rabbitmq, "free_port", first_one_taken)
        with rabbitmq.rabbitmq_node(tmp_path / "node") as node:
            assert held not in (node.amqp_port, node.mqtt_port)
            assert (
                rabbitmq._mqtt_login(node.mqtt_port, node.management_user, node.management_password)
                == 0
            )
    assert len(picked) > 6  # the first boot's ports, then the second's
