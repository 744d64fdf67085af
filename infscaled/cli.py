"""`infscaled` command line. Subcommands import their heavy dependencies lazily."""

from __future__ import annotations

import argparse
import logging
import sys

from infscaled import __version__
from infscaled.errors import InfscaledError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infscaled", description="Serve models as pipelines of stage workers.")
    p.add_argument("--version", action="version", version=f"infscaled {__version__}")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job on this host: dispatcher + stage workers, then a summary")
    run.add_argument("job", help="job file (TOML)")
    run.add_argument("--requests", type=int, help="number of requests (overrides workload.requests)")
    run.add_argument("--rate", type=float, help="Poisson arrivals in requests/s (default: the job's; 0 = closed loop)")
    run.add_argument("--verify", action="store_true",
                     help="compare every result with the monolithic model (max abs error)")
    run.add_argument("--json", metavar="PATH", help="write the summary as JSON")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = getattr(logging, args.log_level)
    from rich.console import Console
    from rich.logging import RichHandler

    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=Console(stderr=True))])
    console = Console()
    try:
        if args.command == "run":
            return _run(args, console, level)
    except InfscaledError as exc:
        # Plain text, never re-wrapped: the message quotes user values (which may look like
        # markup) and its "FILE: KEY = VALUE" line must stay greppable.
        from rich.text import Text

        Console(stderr=True, soft_wrap=True).print(Text("error: ", style="bold red") + Text(str(exc)))
        return 2
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted; workers stopped")
        return 130
    return 0


def _run(args: argparse.Namespace, console: object, level: int) -> int:
    from infscaled.config import load_job
    from infscaled.runner.run import run_job
    from infscaled.runner.summary import render

    if args.requests is not None and args.requests < 1:
        raise InfscaledError(f"--requests {args.requests}: must be at least 1")
    if args.rate is not None and args.rate < 0:
        raise InfscaledError(f"--rate {args.rate}: must be 0 (closed loop) or positive")
    cfg = load_job(args.job)
    summary = run_job(cfg, requests=args.requests, rate=args.rate, verify=args.verify,
                      progress=not args.no_progress and sys.stdout.isatty(), log_level=level)
    console.print(render(summary))  # type: ignore[attr-defined]
    if args.json:
        summary.write_json(args.json)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
