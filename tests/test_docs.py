"""The README, SECURITY.md and docs/ stand on their own: every relative link (and image) points
to a file inside the repository, none outside it (a user who clones the project has nothing
else)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(document: Path) -> None:
    links = LINK.findall(document.read_text())
    for link in links:
        if re.match(r"[a-z]+:", link) or link.startswith("#"):
            continue  # a URL, or an anchor in the same page
        target = (document.parent / link.split("#", 1)[0]).resolve()
        assert target.is_relative_to(ROOT), f"{document.name}: {link} points outside the repo"
        assert target.exists(), f"{document.name}: {link} does not exist"
