"""Runs a Supervisor in a process of its own, for tests that kill the agent itself.

argv: LOG_DIR COMMAND...  Becomes a child subreaper (printing "subreaper True"), looks for orphans
every 0.2 s, starts COMMAND as the app "app", prints "app PID" once it is RUNNING, then runs until
it is killed."""

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from iotbiz.agent import supervisor
from iotbiz.agent.supervisor import AppState, Supervisor, become_subreaper
from iotbiz.settings import AppSettings


async def main() -> None:
    supervisor.REAP_INTERVAL_S = 0.2
    app = AppSettings(name="app", command=tuple(sys.argv[2:]), start_s=0.2)
    running = asyncio.Event()

    def on_event(event: dict[str, Any]) -> None:
        if event.get("to") == AppState.RUNNING:
            running.set()

    sup = Supervisor(
        [app],
        Path(sys.argv[1]),
        log_max_bytes=1 << 20,
        log_backups=1,
        tail_lines=9,
        on_event=on_event,
    )
    await sup.start_all()
    await asyncio.wait_for(running.wait(), 10)
    print(f"app {sup.status('app').pid}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    print(f"subreaper {become_subreaper()}", flush=True)
    asyncio.run(main())
