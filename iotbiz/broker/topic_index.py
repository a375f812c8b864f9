"""Indexes that make what a message, a SUBSCRIBE or a CONNECT costs independent of the fleet size.

amqtt 0.12.1 keeps subscriptions in one dict `{filter: [(session, qos), ...]}` and retained
messages in `{topic: message}`, and walks them whole: every PUBLISH compared its topic with every
filter of every client (10,000 devices each subscribed to their own `cmd`: 10,000 comparisons
per telemetry message), every CONNECT walked all subscriptions to find the client's own, and
every SUBSCRIBE walked all retained messages (each device keeps a retained `status`). mosquitto
fixed the same problem with a subscription tree (eclipse-mosquitto/mosquitto#930); EMQX and
HiveMQ use tries.

`SubscriptionIndex`: filters split into levels once, on SUBSCRIBE. A filter without wildcards
is found by one dict lookup on the topic; filters with `+` or `#` live in a trie of levels, so a
PUBLISH visits only the branches its own levels lead to. Subscriptions are also kept by client
id, so a disconnect, an UNSUBSCRIBE or a resumed session touches only that client's entries.
A message matching several filters of one client is delivered once, at the highest QoS of
those subscriptions [MQTT-3.3.5-1].

`RetainedIndex`: the retained messages as a `MutableMapping[topic, message]` (amqtt's own code
reads and writes it like its dict) that also keeps a trie of the topics' levels: a subscription
without wildcards finds its message by one lookup, one with wildcards walks only the matching
branches.

Matching follows MQTT 3.1.1 section 4.7: levels are separated by `/` and may be empty; `+`
matches exactly one level (an empty one too); `#` (the last level) matches its parent level and
any number of levels below; filters beginning with a wildcard do not match topics beginning with
`$` [MQTT-4.7.2-1]. Both indexes take filters as valid (`is_valid_filter`); the broker refuses
the others before they get here.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Generic, TypeVar

S = TypeVar("S")
M = TypeVar("M")

__all__ = ["RetainedIndex", "SubscriptionIndex", "is_valid_filter", "is_wildcard"]


def is_wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


def is_valid_filter(topic_filter: str) -> bool:
    """A topic filter MQTT 3.1.1 allows: not empty [MQTT-4.7.3-1], `#` alone in the last level
    [MQTT-4.7.1-2], `+` alone in its level [MQTT-4.7.1-3], no NUL [MQTT-4.7.3-2]."""
    if not topic_filter or "\0" in topic_filter:
        return False
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != last):
            return False
        if "+" in level and level != "+":
            return False
    return True


def _merge(into: dict[str, int], found: dict[str, int]) -> None:
    for client_id, qos in found.items():
        if into.get(client_id, -1) < qos:
            into[client_id] = qos


class _FilterNode:
    """One level of the wildcard-filter trie."""

    __slots__ = ("children", "hash", "here", "plus")

    def __init__(self) -> None:
        self.children: dict[str, _FilterNode] | None = None  # literal next levels
        self.plus: _FilterNode | None = None  # `+` as the next level
        self.here: dict[str, int] | None = None  # client id -> QoS of filters ending here
        self.hash: dict[str, int] | None = None  # ... of filters ending here with `/#`

    def is_empty(self) -> bool:
        return not (self.children or self.plus or self.here or self.hash)


class _Client(Generic[S]):
    __slots__ = ("filters", "subscriber")

    def __init__(self, subscriber: S) -> None:
        self.subscriber = subscriber
        self.filters: dict[str, int] = {}  # in subscription order


class SubscriptionIndex(Generic[S]):
    """Subscriptions by topic filter (for matching) and by client id (for the client's own).

    `S` is what a match returns for each client (the broker stores its `Session`).
    """

    def __init__(self) -> None:
        self._exact: dict[str, dict[str, int]] = {}  # filter without wildcards -> client -> QoS
        self._root = _FilterNode()
        self._wildcards = 0  # wildcard subscriptions in the trie (0: skip the walk)
        self._clients: dict[str, _Client[S]] = {}

    def __len__(self) -> int:
        """The number of subscriptions (client, filter)."""
        return sum(len(client.filters) for client in self._clients.values())

    def clear(self) -> None:
        self._exact.clear()
        self._root = _FilterNode()
        self._wildcards = 0
        self._clients.clear()

    # -- changes -----------------------------------------------------------------------------

    def add(self, client_id: str, subscriber: S, topic_filter: str, qos: int) -> bool:
        """Subscribe `client_id` to `topic_filter` at `qos`; True if it is a new subscription,
        False if it replaced the client's existing one on that filter [MQTT-3.8.4-3]."""
        client = self._clients.get(client_id)
        if client is None:
            client = self._clients[client_id] = _Client(subscriber)
        client.subscriber = subscriber
        new = topic_filter not in client.filters
        client.filters[topic_filter] = qos
        if not is_wildcard(topic_filter):
            self._exact.setdefault(topic_filter, {})[client_id] = qos
            return new
        node = self._root
        levels = topic_filter.split("/")
        hash_last = levels[-1] == "#"
        for level in levels[:-1] if hash_last else levels:
            if level == "+":
                if node.plus is None:
                    node.plus = _FilterNode()
                node = node.plus
            else:
                if node.children is None:
                    node.children = {}
                child = node.children.get(level)
                if child is None:
                    child = node.children[level] = _FilterNode()
                node = child
        if hash_last:
            if node.hash is None:
                node.hash = {}
            node.hash[client_id] = qos
        else:
            if node.here is None:
                node.here = {}
            node.here[client_id] = qos
        if new:
            self._wildcards += 1
        return new

    def remove(self, client_id: str, topic_filter: str) -> bool:
        """Unsubscribe `client_id` from `topic_filter`; False if it was not subscribed."""
        client = self._clients.get(client_id)
        if client is None or client.filters.pop(topic_filter, None) is None:
            return False
        if not client.filters:
            del self._clients[client_id]
        if not is_wildcard(topic_filter):
            subscribers = self._exact[topic_filter]
            del subscribers[client_id]
            if not subscribers:
                del self._exact[topic_filter]
            return True
        self._remove_wildcard(client_id, topic_filter)
        self._wildcards -= 1
        return True

    def _remove_wildcard(self, client_id: str, topic_filter: str) -> None:
        levels = topic_filter.split("/")
        hash_last = levels[-1] == "#"
        path: list[tuple[_FilterNode, str]] = []  # (parent, level taken from it)
        node = self._root
        for level in levels[:-1] if hash_last else levels:
            path.append((node, level))
            child = node.plus if level == "+" else (node.children or {}).get(level)
            if child is None:  # pragma: no cover - the client's filters say it is here
                raise KeyError(topic_filter)
            node = child
        subscribers = node.hash if hash_last else node.here
        if subscribers is None:  # pragma: no cover - as above
            raise KeyError(topic_filter)
        del subscribers[client_id]
        if not subscribers:
            if hash_last:
                node.hash = None
            else:
                node.here = None
        for parent, level in reversed(path):  # prune the branches left empty
            if not node.is_empty():
                break
            if level == "+":
                parent.plus = None
            elif parent.children is not None:
                del parent.children[level]
                if not parent.children:
                    parent.children = None
            node = parent

    def remove_client(self, client_id: str) -> int:
        """Remove every subscription of `client_id`; how many there were."""
        client = self._clients.get(client_id)
        if client is None:
            return 0
        filters = list(client.filters)
        for topic_filter in filters:
            self.remove(client_id, topic_filter)
        return len(filters)

    # -- queries -----------------------------------------------------------------------------

    def filters_of(self, client_id: str) -> list[tuple[str, int]]:
        """The client's subscriptions (filter, QoS), in the order it made them."""
        client = self._clients.get(client_id)
        return list(client.filters.items()) if client is not None else []

    def subscriber_of(self, client_id: str) -> S | None:
        client = self._clients.get(client_id)
        return client.subscriber if client is not None else None

    def match(self, topic: str) -> list[tuple[S, int]]:
        """Who receives a message on `topic`: each subscribed client once, with the highest QoS
        of its matching subscriptions."""
        found = self.match_ids(topic)
        clients = self._clients
        return [(clients[client_id].subscriber, qos) for client_id, qos in found.items()]

    def match_ids(self, topic: str) -> dict[str, int]:
        """Client id -> highest QoS of its subscriptions matching `topic`."""
        exact = self._exact.get(topic)
        found: dict[str, int] = dict(exact) if exact else {}
        if not self._wildcards:
            return found
        levels = topic.split("/")
        end = len(levels)
        dollar = topic.startswith("$")  # [MQTT-4.7.2-1]: no first-level wildcard matches it
        stack: list[tuple[_FilterNode, int]] = [(self._root, 0)]
        while stack:
            node, index = stack.pop()
            if node.hash and not (dollar and index == 0):
                _merge(found, node.hash)  # `#` matches the parent level and all below
            if index == end:
                if node.here:
                    _merge(found, node.here)
                continue
            if node.children is not None:
                child = node.children.get(levels[index])
                if child is not None:
                    stack.append((child, index + 1))
            if node.plus is not None and not (dollar and index == 0):
                stack.append((node.plus, index + 1))
        return found

    def as_dict(self) -> dict[str, list[tuple[S, int]]]:
        """amqtt's shape, `{filter: [(subscriber, qos), ...]}` (a snapshot, for inspection)."""
        shape: dict[str, list[tuple[S, int]]] = {}
        for client in self._clients.values():
            for topic_filter, qos in client.filters.items():
                shape.setdefault(topic_filter, []).append((client.subscriber, qos))
        return shape


class _TopicNode:
    """One level of the retained-topic trie; `topic` is set where a retained topic ends."""

    __slots__ = ("children", "topic")

    def __init__(self) -> None:
        self.children: dict[str, _TopicNode] | None = None
        self.topic: str | None = None


class RetainedIndex(MutableMapping[str, M]):
    """Retained messages by topic, with the topics' levels in a trie for wildcard filters.

    Behaves as amqtt's `{topic: message}` dict (insertion order kept for iteration), so amqtt's
    `retain_message` and everything that reads `broker.retained_messages` work unchanged.
    """

    def __init__(self) -> None:
        self._messages: dict[str, M] = {}
        self._root = _TopicNode()

    def __getitem__(self, topic: str) -> M:
        return self._messages[topic]

    def __setitem__(self, topic: str, message: M) -> None:
        if topic not in self._messages:
            node = self._root
            for level in topic.split("/"):
                if node.children is None:
                    node.children = {}
                child = node.children.get(level)
                if child is None:
                    child = node.children[level] = _TopicNode()
                node = child
            node.topic = topic
        self._messages[topic] = message

    def __delitem__(self, topic: str) -> None:
        del self._messages[topic]
        path: list[tuple[_TopicNode, str]] = []
        node = self._root
        for level in topic.split("/"):
            path.append((node, level))
            node = (node.children or {})[level]
        node.topic = None
        for parent, level in reversed(path):
            if node.topic is not None or node.children:
                break
            if parent.children is not None:
                del parent.children[level]
                if not parent.children:
                    parent.children = None
            node = parent

    def __iter__(self) -> Iterator[str]:
        return iter(self._messages)

    def __len__(self) -> int:
        return len(self._messages)

    def __contains__(self, topic: object) -> bool:
        return topic in self._messages

    def clear(self) -> None:
        self._messages.clear()
        self._root = _TopicNode()

    def matching(self, topic_filter: str) -> list[tuple[str, M]]:
        """The retained (topic, message) pairs a subscription to `topic_filter` receives."""
        if not is_wildcard(topic_filter):
            message = self._messages.get(topic_filter)
            return [] if message is None else [(topic_filter, message)]
        levels = topic_filter.split("/")
        end = len(levels)
        topics: list[str] = []
        stack: list[tuple[_TopicNode, int]] = [(self._root, 0)]
        while stack:
            node, index = stack.pop()
            if index == end:
                if node.topic is not None:
                    topics.append(node.topic)
                continue
            level = levels[index]
            if level == "#":
                if node.topic is not None:  # `a/#` matches `a` too
                    topics.append(node.topic)
                self._collect_below(node, topics, skip_dollar=index == 0)
                continue
            children = node.children
            if children is None:
                continue
            if level == "+":
                for name, child in children.items():
                    if not (index == 0 and name.startswith("$")):  # [MQTT-4.7.2-1]
                        stack.append((child, index + 1))
            else:
                literal = children.get(level)
                if literal is not None:
                    stack.append((literal, index + 1))
        messages = self._messages
        return [(topic, messages[topic]) for topic in topics]

    @staticmethod
    def _collect_below(node: _TopicNode, topics: list[str], *, skip_dollar: bool) -> None:
        pending = [
            child
            for name, child in (node.children or {}).items()
            if not (skip_dollar and name.startswith("$"))
        ]
        while pending:
            current = pending.pop()
            if current.topic is not None:
                topics.append(current.topic)
            if current.children:
                pending.extend(current.children.values())
