"""Device and customer ids: property tests over what may come from outside."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from iotbiz.names import (
    DeviceName,
    is_customer_id,
    normalize_device_id,
    parse_device_name,
)

TOPIC_SAFE = re.compile(r"[A-Za-z0-9:_-]{1,64}")
hex_pairs = st.lists(st.sampled_from("0123456789abcdefABCDEF"), min_size=12, max_size=12).map(
    "".join
)


@given(st.text(max_size=80))
def test_an_accepted_device_id_is_always_topic_safe(text: str) -> None:
    device_id = normalize_device_id(text)
    if device_id is not None:
        assert TOPIC_SAFE.fullmatch(device_id)
        assert device_id[0].isalnum()
        assert normalize_device_id(device_id) == device_id  # canonical form is stable


@given(st.text(max_size=80))
def test_an_accepted_customer_id_is_always_topic_safe(text: str) -> None:
    if is_customer_id(text):
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", text)


@given(st.text(alphabet=st.sampled_from("/+#. \x00\n\té€"), min_size=1), st.text(max_size=10))
def test_ids_with_unsafe_characters_are_refused(bad: str, rest: str) -> None:
    assert normalize_device_id("a" + bad + rest) is None
    assert not is_customer_id("a" + bad + rest)


@given(hex_pairs)
def test_every_mac_notation_normalises_to_lower_colon_form(digits: str) -> None:
    pairs = [digits[i : i + 2] for i in range(0, 12, 2)]
    canonical = ":".join(pairs).lower()
    for notation in (
        ":".join(pairs),
        "-".join(pairs),
        digits,
        ".".join(digits[i : i + 4] for i in range(0, 12, 4)),
        canonical.upper(),
    ):
        assert normalize_device_id(notation) == canonical


def test_mixed_separators_are_not_a_mac() -> None:
    # not a MAC notation, but a valid other id: kept exactly as given
    assert normalize_device_id("44:8A-5b:9c:70:93") == "44:8A-5b:9c:70:93"
    assert normalize_device_id("44.8a.5b.9c.70.93") is None  # '.' only in Cisco's form


def test_device_names() -> None:
    assert parse_device_name("abc/44-8A-5B-9C-70-93") == DeviceName("abc", "44:8a:5b:9c:70:93")
    assert str(DeviceName("abc", "dev")) == "abc/dev"
    for bad in ("abc", "abc/", "/dev", "a/b/c", "a b/dev", "abc/dev#"):
        assert parse_device_name(bad) is None
