"""`python -m iotbiz.agent --config agent.toml`: run the device agent."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from iotbiz import __version__
from iotbiz.errors import IotbizError
from iotbiz.settings import load_agent_settings

# Signals that arrive before the event loop's handlers are installed (while Python imports the
# agent's heavier modules): remembered, and the agent stops as soon as it can, with exit code 0.
_EARLY_SIGNALS: list[int] = []


def _remember(signum: int, _frame: FrameType | None) -> None:
    _EARLY_SIGNALS.append(signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _remember)
    signal.signal(signal.SIGINT, _remember)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iotbiz.agent", description="IoTBiz agent")
    parser.add_argument("--config", type=Path, required=True, help="agent TOML file")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--version", action="version", version=f"iotbiz-agent {__version__}")
    args = parser.parse_args(argv)
    from iotbiz.agent.agent import run_agent

    try:
        overrides = {"log_level": args.log_level} if args.log_level else {}
        settings = load_agent_settings(args.config, overrides=overrides)
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        return asyncio.run(run_agent(settings, _EARLY_SIGNALS))
    except IotbizError as exc:
        print(f"iotbiz-agent: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
