"""Runs a Supervisor in a process of its own, for tests that kill or restart the agent itself.

argv: LOG_DIR [--state FILE] [--user USER] COMMAND...  Becomes a child subreaper (printing
"subreaper True"), looks for orphans every 0.2 s, starts COMMAND as the app "app" (as USER;
remembering operator stops in FILE), prints "app PID" once it is RUNNING (or "app STATE REASON"
when start_all left it alone), then obeys lines on stdin: "stop" and "start" (answering
"app STATE REASON") until it is killed."""

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from iotbiz.agent import supervisor
from iotbiz.agent.supervisor import AppState, AppStatus, Supervisor, become_subreaper
from iotbiz.settings import AppSettings


def describe(status: AppStatus) -> str:
    return f"app {status.state} {status.reason}"


async def main() -> None:
    supervisor.REAP_INTERVAL_S = 0.2
    args = sys.argv[2:]
    state_file = user = None
    if args[0] == "--state":
        state_file, args = Path(args[1]), args[2:]
    if args[0] == "--user":
        user, args = args[1], args[2:]
    app = AppSettings(name="app", command=tuple(args), start_s=0.2, user=user)
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
        state_file=state_file,
    )
    await sup.start_all()
    if sup.status("app").state is AppState.STOPPED:
        print(describe(sup.status("app")), flush=True)
    else:
        await asyncio.wait_for(running.wait(), 10)
        print(f"app {sup.status('app').pid}", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        status = await (sup.stop("app") if line == "stop" else sup.start("app"))
        print(describe(status), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    print(f"subreaper {become_subreaper()}", flush=True)
    asyncio.run(main())
