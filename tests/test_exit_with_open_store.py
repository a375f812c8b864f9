"""A process that leaves a store open still exits (aiosqlite's thread kept it alive for ever)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_process_with_an_open_store_exits(tmp_path: Path) -> None:
    program = textwrap.dedent(
        f"""
        import asyncio
        from pathlib import Path
        from iotbiz.store import Store

        async def main():
            await Store.open(Path({str(tmp_path / "iotbiz.db")!r}))  # never closed

        asyncio.run(main())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, timeout=30, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
