"""`iotbiz.broker.topic_index` against a plain matcher written from MQTT 3.1.1 section 4.7.

The reference (`spec_matches`) follows the specification's text level by level and knows
nothing of the indexes; hypothesis draws filters and topics from a small alphabet of levels
(with empty levels, `+`, `#` and `$` levels) so that matches are frequent.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from iotbiz.broker.topic_index import RetainedIndex, SubscriptionIndex, is_valid_filter


def spec_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 4.7: does a subscription to `topic_filter` receive a message on `topic`?"""
    # [MQTT-4.7.2-1] a filter starting with a wildcard does not match a topic starting with $
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")  # [MQTT-4.7.1-1] "/" separates levels, which may be empty
    t_levels = topic.split("/")
    for i, f_level in enumerate(f_levels):
        if f_level == "#":  # 4.7.1.2: the parent level and any number of child levels
            return True
        if i >= len(t_levels):
            return False
        if f_level != "+" and f_level != t_levels[i]:  # 4.7.1.3: + matches exactly one level
            return False
    return len(f_levels) == len(t_levels)


TOPIC_LEVELS = st.sampled_from(["a", "b", "", "$SYS", "$x", "dev-1", "cmd"])
topics = st.lists(TOPIC_LEVELS, min_size=1, max_size=5).map("/".join).filter(bool)


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from(["a", "b", "", "$SYS", "$x", "+", "cmd"]), max_size=4))
    if draw(st.booleans()) or not levels:
        levels.append("#")
    return "/".join(levels) or "/"  # a filter is never empty [MQTT-4.7.3-1]


subscriptions = st.lists(
    st.tuples(st.sampled_from(["c1", "c2", "c3", "c4"]), filters(), st.integers(0, 2)),
    max_size=25,
)


def expected_receivers(subs: dict[tuple[str, str], int], topic: str) -> dict[str, int]:
    receivers: dict[str, int] = {}
    for (client_id, topic_filter), qos in subs.items():
        if spec_matches(topic_filter, topic):
            receivers[client_id] = max(qos, receivers.get(client_id, -1))
    return receivers


def test_reference_matcher_agrees_with_the_specifications_examples() -> None:
    """The examples of MQTT 3.1.1 4.7.1.2, 4.7.1.3 and 4.7.2, so the reference is right."""
    assert spec_matches("sport/tennis/player1/#", "sport/tennis/player1")
    assert spec_matches("sport/tennis/player1/#", "sport/tennis/player1/ranking")
    assert spec_matches("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon")
    assert spec_matches("sport/#", "sport")
    assert spec_matches("sport/tennis/+", "sport/tennis/player1")
    assert not spec_matches("sport/tennis/+", "sport/tennis/player1/ranking")
    assert not spec_matches("sport/+", "sport")
    assert spec_matches("sport/+", "sport/")
    assert spec_matches("+/+", "/finance")
    assert spec_matches("/+", "/finance")
    assert not spec_matches("+", "/finance")
    assert not spec_matches("#", "$SYS/uptime")
    assert not spec_matches("+/monitor/Clients", "$SYS/monitor/Clients")
    assert spec_matches("$SYS/#", "$SYS/monitor/Clients")
    assert spec_matches("$SYS/monitor/+", "$SYS/monitor/Clients")


@settings(max_examples=400, deadline=None)
@given(subscriptions, st.lists(topics, min_size=1, max_size=10))
def test_index_selects_exactly_the_subscribers_the_spec_selects(
    subs: list[tuple[str, str, int]], probe_topics: list[str]
) -> None:
    index: SubscriptionIndex[str] = SubscriptionIndex()
    model: dict[tuple[str, str], int] = {}
    for client_id, topic_filter, qos in subs:
        assert is_valid_filter(topic_filter)
        new = index.add(client_id, client_id, topic_filter, qos)
        assert new == ((client_id, topic_filter) not in model)
        model[(client_id, topic_filter)] = qos
    for topic in probe_topics:
        assert index.match_ids(topic) == expected_receivers(model, topic)
        assert sorted(index.match(topic)) == sorted(expected_receivers(model, topic).items())


@settings(max_examples=300, deadline=None)
@given(subscriptions, st.data())
def test_unsubscribe_and_disconnect_touch_only_that_clients_entries(
    subs: list[tuple[str, str, int]], data: st.DataObject
) -> None:
    index: SubscriptionIndex[str] = SubscriptionIndex()
    model: dict[tuple[str, str], int] = {}
    for client_id, topic_filter, qos in subs:
        index.add(client_id, client_id, topic_filter, qos)
        model[(client_id, topic_filter)] = qos
    for client_id, topic_filter, _ in data.draw(st.lists(st.sampled_from(subs))) if subs else []:
        removed = index.remove(client_id, topic_filter)
        assert removed == ((client_id, topic_filter) in model)
        model.pop((client_id, topic_filter), None)
    gone = data.draw(st.sampled_from(["c1", "c2", "c3", "c4"]))
    expected_count = sum(1 for (c, _) in model if c == gone)
    assert index.remove_client(gone) == expected_count
    model = {key: qos for key, qos in model.items() if key[0] != gone}
    assert index.filters_of(gone) == []
    assert len(index) == len(model)
    for topic in data.draw(st.lists(topics, min_size=1, max_size=10)):
        assert index.match_ids(topic) == expected_receivers(model, topic)
    for client_id, topic_filter in list(model):
        index.remove(client_id, topic_filter)
    assert len(index) == 0
    assert index.match_ids("a/b") == {}
    assert index._root.is_empty()  # every branch pruned


def test_filters_of_keeps_subscription_order_and_a_resubscribe_replaces_the_qos() -> None:
    index: SubscriptionIndex[str] = SubscriptionIndex()
    assert index.add("c1", "s1", "a/+", 0)
    assert index.add("c1", "s1", "b", 1)
    assert not index.add("c1", "s1-new", "a/+", 2)  # [MQTT-3.8.4-3] replaces, not duplicates
    assert index.filters_of("c1") == [("a/+", 2), ("b", 1)]
    assert index.match("a/x") == [("s1-new", 2)]  # the latest subscriber object is returned
    assert index.subscriber_of("c1") == "s1-new"
    assert index.as_dict() == {"a/+": [("s1-new", 2)], "b": [("s1-new", 1)]}


def test_is_valid_filter_follows_the_specification() -> None:
    for good in ("#", "+", "a/#", "+/+/x", "/", "a//b", "$SYS/#", "sport/tennis/#"):
        assert is_valid_filter(good), good
    for bad in ("", "a#", "a/#/b", "#/a", "a+", "+a/b", "sport/tennis#", "a\0b"):
        assert not is_valid_filter(bad), bad


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(topics, st.booleans()), max_size=30),
    st.lists(filters() | topics, min_size=1, max_size=10),
)
def test_retained_index_finds_exactly_the_matching_messages(
    changes: list[tuple[str, bool]], probe_filters: list[str]
) -> None:
    index: RetainedIndex[str] = RetainedIndex()
    model: dict[str, str] = {}
    for n, (topic, keep) in enumerate(changes):
        if keep:
            index[topic] = model[topic] = f"m{n}"
        elif topic in model:
            del index[topic]
            del model[topic]
    assert dict(index) == model
    assert list(index) == list(model)  # iteration keeps insertion order, like amqtt's dict
    for topic_filter in probe_filters:
        expected = sorted((t, m) for t, m in model.items() if spec_matches(topic_filter, t))
        assert sorted(index.matching(topic_filter)) == expected
    for topic in list(model):
        del index[topic]
    assert index._root.children is None  # every branch pruned
    index["x"] = "y"
    index.clear()
    assert index.matching("#") == []
