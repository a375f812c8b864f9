"""`python -m iotbiz.agent --config agent.toml`: run the device agent."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from iotbiz import __version__
from iotbiz.errors import IotbizError
from iotbiz.settings import load_agent_settings


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
        asyncio.run(run_agent(settings))
    except IotbizError as exc:
        print(f"iotbiz-agent: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
