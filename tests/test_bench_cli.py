"""scripts/bench.py refuses an output path it could not write before it runs for minutes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


@pytest.mark.parametrize("flag", ["--out", "--plot"])
def test_a_missing_output_folder_is_refused_at_once(tmp_path: Path, flag: str) -> None:
    missing = tmp_path / "nowhere" / "result"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", flag, str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert f"{flag}: no folder {missing.parent}" in done.stderr
    assert not list(tmp_path.iterdir())
