"""`python -m infscaled.agent --controller URL [--token T] ...`: run an agent daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys

from infscaled.agent.config import AgentConfig
from infscaled.agent.run import run
from infscaled.errors import InfscaledError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infscaled.agent", description="Run an infscaled agent daemon.")
    p.add_argument("--controller", required=True, help="controller URL, e.g. http://10.0.0.5:8400")
    p.add_argument("--token", default=os.environ.get("INFSCALED_TOKEN", ""),
                   help="agent token (default: $INFSCALED_TOKEN)")
    p.add_argument("--id", dest="agent_id", default=socket.gethostname(), help="agent name (default: hostname)")
    p.add_argument("--devices", default="auto", help="auto | cpu:N | cuda:0,cuda:1")
    p.add_argument("--advertise", default="", help="address other hosts reach this one at")
    p.add_argument("--port-range", default="29500-29999", help="FIRST-LAST ports for edges hosted here")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = getattr(logging, args.log_level)
    logging.basicConfig(level=level, format="%(asctime)s agent %(levelname)s %(name)s: %(message)s")
    try:
        first, _, last = args.port_range.partition("-")
        port_range = (int(first), int(last or first))
    except ValueError:
        print(f"error: --port-range {args.port_range!r}: expected FIRST-LAST", file=sys.stderr)
        return 2
    try:
        cfg = AgentConfig(controller=args.controller, token=args.token, agent_id=args.agent_id,
                          devices=args.devices, advertise=args.advertise, port_range=port_range,
                          worker_log_level=level)
        asyncio.run(run(cfg))
    except InfscaledError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
