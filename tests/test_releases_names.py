"""Release app names and versions become path parts and URL segments: whatever `check_name`
accepts stays one harmless path component (hypothesis over any text)."""

from __future__ import annotations

import urllib.parse
from pathlib import PurePosixPath

from hypothesis import given
from hypothesis import strategies as st

from iotbiz.releases import ReleaseError, check_name


@given(st.text(max_size=80), st.text(max_size=80))
def test_accepted_names_are_single_safe_path_parts(app: str, version: str) -> None:
    try:
        check_name(app, version)
    except ReleaseError as exc:
        message = str(exc)
    else:
        message = ""
    if message:
        assert message.startswith(("app ", "version "))
        return
    for part in (app, version):
        assert part not in ("", ".", "..")
        assert PurePosixPath(part).parts == (part,)
        assert urllib.parse.quote(part, safe="") == part.replace("+", "%2B")
        assert 1 <= len(part) <= 64


def test_examples() -> None:
    check_name("web", "1.2.0+build.7")
    for app, version in (("web/x", "1"), ("..", "1"), ("web", ".."), ("web", "1 0"), ("", "1")):
        try:
            check_name(app, version)
        except ReleaseError:
            continue
        raise AssertionError(f"{app!r} {version!r} accepted")
