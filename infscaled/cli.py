"""`infscaled` command line. Subcommands import their heavy dependencies lazily."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from infscaled import __version__
from infscaled.errors import InfscaledError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infscaled", description="Serve models as pipelines of stage workers.")
    p.add_argument("--version", action="version", version=f"infscaled {__version__}")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="default: INFO for daemons, WARNING for commands")
    daemon = p.add_argument_group("daemons", "infscaled --role controller|agent [options]")
    daemon.add_argument("--role", choices=["controller", "agent"], help="run a daemon instead of a command")
    daemon.add_argument("--config", help="controller: its TOML config (see configs/controller.toml)")
    daemon.add_argument("--host", help="controller: address to bind (default 127.0.0.1)")
    daemon.add_argument("--port", type=int, help="controller: port (default 8470)")
    daemon.add_argument("--model-root", dest="model_roots", action="append", metavar="DIR",
                        help="controller: a directory job model paths may lie under (repeat; default: none); "
                             "agent: the same check again on this host (default: the controller's only)")
    daemon.add_argument("--controller", dest="controller_url",
                        help="agent: the controller's URL, e.g. http://10.0.0.5:8470")
    daemon.add_argument("--id", dest="agent_id", help="agent: its name (default: the hostname)")
    daemon.add_argument("--devices", default="auto", help="agent: auto | cpu:N | cuda:0,cuda:1 (default auto)")
    daemon.add_argument("--advertise", default="", help="agent: the address other hosts reach this one at")
    daemon.add_argument("--port-range", default="29500-29999", help="agent: FIRST-LAST ports for edges hosted here")
    daemon.add_argument("--allow-python-sources", action="store_true",
                        help="agent: run python:MODULE:FACTORY model sources (they run code on this host)")
    daemon.add_argument("--orphan-grace", type=float, default=120.0, metavar="SECONDS",
                        help="agent: with the controller unreachable this long, stop its jobs (default 120)")
    daemon.add_argument("--token", help="token (default: $INFSCALED_TOKEN, else the local controller's token file)")
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run a job on this host: dispatcher + stage workers, then a summary")
    run.add_argument("job", help="job file (TOML)")
    run.add_argument("--requests", type=int, help="number of requests (overrides workload.requests)")
    run.add_argument("--rate", type=float, help="Poisson arrivals in requests/s (default: the job's; 0 = closed loop)")
    run.add_argument("--verify", action="store_true",
                     help="compare every result with the monolithic model (max abs error)")
    run.add_argument("--json", metavar="PATH", help="write the summary as JSON")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--scale-at", action="append", default=[], metavar="T:STAGE=N",
                     help="T s into the workload, scale stage STAGE to N replicas while serving "
                          "(T:chains=N for a generation job's replica chains); repeatable")
    run.add_argument("--fault-at", action="append", default=[], metavar="T:NODE[:stop]",
                     help="T s into the workload, kill -9 stage replica NODE (e.g. 3:1.1; with :stop, "
                          "SIGSTOP it: a hang) and watch the job recover; repeatable")

    up = sub.add_parser("up", help="controller + local agent in one process: submit a job, drive it, stop")
    up.add_argument("job", nargs="?", help="job file (default: configs/jobs/quickstart.toml)")
    up.add_argument("--requests", type=int, help="number of requests (overrides workload.requests)")
    up.add_argument("--rate", type=float, help="Poisson arrivals in requests/s (0 = closed loop)")
    up.add_argument("--verify", action="store_true", help="compare every result with the monolithic model")
    up.add_argument("--json", metavar="PATH", help="write the summary as JSON")
    up.add_argument("--no-progress", action="store_true", help="no progress bar")
    up.add_argument("--tui", action="store_true",
                    help="watch the job in the TUI while the workload runs; quitting the TUI stops everything")
    up.add_argument("--port-range", dest="edge_ports", metavar="FIRST-LAST",
                    help="ports for the job's edges (default 29500-29999); give another range to run two "
                         "`up` or `serve` on one host at once")

    serve = sub.add_parser("serve", help="controller + local agent in one process, the job kept running for "
                                         "any client (OpenAI API, inference API) until Ctrl-C")
    serve.add_argument("job", help="job file (TOML), e.g. configs/jobs/llama-generate.toml")
    serve.add_argument("--host", dest="serve_host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", dest="serve_port", type=int, help="port (default 8470; 0 = any free port)")
    serve.add_argument("--config", dest="serve_config", help="controller config (TOML, see configs/controller.toml)")
    serve.add_argument("--devices", dest="serve_devices",
                       help="the local agent's devices: auto | cpu:N | cuda:0,cuda:1 (default: the GPUs, else "
                            "one CPU slot per stage replica)")
    serve.add_argument("--port-range", dest="edge_ports", metavar="FIRST-LAST",
                       help="ports for the job's edges (default 29500-29999); give another range to run two "
                            "`up` or `serve` on one host at once")

    sub.add_parser("token", help="print the local controller's API token (for INFSCALED_TOKEN)")

    tui = sub.add_parser("tui", help="live dashboard of a controller: agents, jobs, pipelines, events")
    tui.add_argument("--controller", dest="tui_controller", metavar="URL",
                     help="controller URL (default http://127.0.0.1:8470)")
    tui.add_argument("--token", dest="tui_token", metavar="TOKEN",
                     help="token (default: $INFSCALED_TOKEN or the local token file)")
    tui.add_argument("--interval", dest="tui_interval", type=float, metavar="SECONDS",
                     help="seconds between snapshots (default: the controller's, 1 s)")
    tui.add_argument("--job", dest="tui_job", metavar="ID",
                     help="the job whose pipeline to show first (default: the newest running)")

    job = sub.add_parser("job", help="manage jobs on a controller")
    job.add_argument("--controller", dest="job_controller", help="controller URL (default http://127.0.0.1:8470)")
    job.add_argument("--token", dest="job_token", help="token (default: $INFSCALED_TOKEN or the local token file)")
    actions = job.add_subparsers(dest="action", required=True)
    actions.add_parser("submit", help="submit a job file").add_argument("file")
    actions.add_parser("list", help="list jobs")
    actions.add_parser("status", help="a job's state and where each stage replica runs").add_argument("id")
    actions.add_parser("stop", help="stop a job").add_argument("id")
    scale = actions.add_parser("scale", help="scale a running job's stage (or a generation job's replica chains) "
                                             "while it serves")
    scale.add_argument("id")
    scale.add_argument("--stage", type=int, help="the stage to scale (omit for a generation job's chains)")
    scale.add_argument("--replicas", type=int, required=True, help="the replica count it should have")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.role is None) == (args.command is None):
        parser.error("give either --role controller|agent or a command (run, up, serve, token, tui, job)")
    level = getattr(logging, args.log_level or ("INFO" if args.role else "WARNING"))
    from rich.console import Console
    from rich.logging import RichHandler

    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=Console(stderr=True))])
    console = Console()
    try:
        if args.role == "controller":
            return _controller(args)
        if args.role == "agent":
            return _agent(args, level)
        if args.command == "run":
            return _run(args, console, level)
        if args.command == "up":
            return _up(args, console, level)
        if args.command == "tui":
            return _tui(args)
        if args.command == "serve":
            return _serve_job(args, console, level)
        if args.command == "token":
            from infscaled.runner.jobcmd import resolve_token

            print(resolve_token(None))
            return 0
        if args.command == "job":
            from infscaled.runner.jobcmd import run_job_command

            return run_job_command(args.action, getattr(args, "file", None) or getattr(args, "id", None),
                                   args.job_controller, args.job_token, console,
                                   scale=(args.stage, args.replicas) if args.action == "scale" else None)
    except InfscaledError as exc:
        return _error(exc)
    except BaseExceptionGroup as group:
        # asyncio task groups (`up`, `serve`) wrap what failed: say the failure, not the group.
        leaf = _first_leaf(group)
        if isinstance(leaf, KeyboardInterrupt):
            Console(stderr=True).print("interrupted; workers stopped")
            return 130
        if isinstance(leaf, InfscaledError):
            return _error(leaf)
        raise
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted; workers stopped")
        return 130
    return 0


def _check_workload_args(args: argparse.Namespace) -> None:
    """--requests / --rate of `run` and `up`."""
    if args.requests is not None and args.requests < 1:
        raise InfscaledError(f"--requests {args.requests}: must be at least 1")
    if args.rate is not None and args.rate < 0:
        raise InfscaledError(f"--rate {args.rate}: must be 0 (closed loop) or positive")


def _error(exc: InfscaledError) -> int:
    # Plain text, never re-wrapped: the message quotes user values (which may look like
    # markup) and its "FILE: KEY = VALUE" line must stay greppable.
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True, soft_wrap=True).print(Text("error: ", style="bold red") + Text(str(exc)))
    return 2


def _first_leaf(exc: BaseException) -> BaseException:
    """The first exception inside (possibly nested) exception groups, preferring a known error."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for inner in e.exceptions:
                walk(inner)
        else:
            leaves.append(e)

    walk(exc)
    return next((e for e in leaves if isinstance(e, InfscaledError | KeyboardInterrupt)), leaves[0])


def _run(args: argparse.Namespace, console: object, level: int) -> int:
    # Flags and the job file are checked before torch is imported: a typo is answered at once.
    from infscaled.config import load_job
    from infscaled.runner.scaling import parse_fault_at, parse_scale_at

    _check_workload_args(args)
    steps: list[Any] = [parse_scale_at(text) for text in args.scale_at]
    steps += [parse_fault_at(text) for text in args.fault_at]
    cfg = load_job(args.job)
    from infscaled.runner.run import render_summary, run_job

    summary = run_job(cfg, requests=args.requests, rate=args.rate, verify=args.verify,
                      progress=not args.no_progress and sys.stdout.isatty(), log_level=level, scale_at=steps)
    console.print(render_summary(summary))  # type: ignore[attr-defined]
    if args.json:
        summary.write_json(args.json)
    return 0 if summary.ok else 1


def _controller(args: argparse.Namespace) -> int:
    import dataclasses

    from infscaled.controller.config import ControllerConfig, load_controller_config
    from infscaled.controller.run import run

    cfg = load_controller_config(args.config) if args.config else ControllerConfig()
    overrides: dict[str, Any] = {k: v for k, v in (("host", args.host), ("port", args.port), ("token", args.token))
                                 if v is not None}
    if args.model_roots:
        overrides["model_roots"] = tuple(str(Path(r).expanduser().resolve()) for r in args.model_roots)
    cfg = dataclasses.replace(cfg, **overrides)
    _serve(run(cfg), cancel_on_signals=True)
    return 0


def _agent(args: argparse.Namespace, level: int) -> int:
    from infscaled.agent.config import AgentConfig
    from infscaled.agent.run import run
    from infscaled.runner.jobcmd import resolve_token

    if not args.controller_url:
        raise InfscaledError("--role agent needs --controller URL (e.g. http://127.0.0.1:8470)")
    extra = {"agent_id": args.agent_id} if args.agent_id else {}
    cfg = AgentConfig(controller=args.controller_url, token=resolve_token(args.token), devices=args.devices,
                      advertise=args.advertise, port_range=_port_range(args.port_range),
                      worker_log_level=level, orphan_grace_s=args.orphan_grace,
                      allow_python_sources=args.allow_python_sources,
                      model_roots=tuple(str(Path(r).expanduser().resolve()) for r in args.model_roots)
                      if args.model_roots else None, **extra)
    _serve(run(cfg))
    return 0


def _serve(coro: Coroutine[Any, Any, None], cancel_on_signals: bool = False) -> None:
    """Run a daemon until SIGINT/SIGTERM. Its shutdown is ordered (see each role's run): a
    signal cancels the role's task, which then stops its work in reverse start-up order."""
    import asyncio
    import signal

    async def main() -> None:
        task = asyncio.ensure_future(coro)
        if cancel_on_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


def _port_range(text: str) -> tuple[int, int]:
    first, _, last = text.partition("-")
    if not (first.isdigit() and (last or first).isdigit()):
        raise InfscaledError(f"--port-range {text!r}: expected FIRST-LAST, e.g. 29500-29999")
    lo, hi = int(first), int(last or first)
    if not 1 <= lo <= hi <= 65535:
        raise InfscaledError(f"--port-range {text!r}: expected 1 <= FIRST <= LAST <= 65535")
    return lo, hi


def _serve_job(args: argparse.Namespace, console: Any, level: int) -> int:
    import dataclasses
    from pathlib import Path

    from infscaled.config import load_job
    from infscaled.controller.config import ControllerConfig, load_controller_config
    from infscaled.runner.serve import Served, default_devices, serve

    cfg = load_job(args.job)  # a bad job file fails here, before anything starts
    ports = _port_range(args.edge_ports) if args.edge_ports else None
    # Without a config: one user serving their own files on their host, as `up` (any model directory).
    ccfg = load_controller_config(args.serve_config) if args.serve_config else ControllerConfig(model_roots=None)
    overrides = {k: v for k, v in (("host", args.serve_host), ("port", args.serve_port)) if v is not None}
    ccfg = dataclasses.replace(ccfg, **overrides)
    devices = args.serve_devices or default_devices(cfg)

    def ready(served: Served) -> None:
        for line in served.lines():
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        sys.stdout.flush()

    console.print(f"starting {cfg.name} on {devices} ...", markup=False, highlight=False)
    _serve(serve(Path(args.job), cfg, ccfg, devices, log_level=level, on_ready=ready, port_range=ports),
           cancel_on_signals=True)
    console.print("stopped", markup=False)
    return 0


def _needs_terminal(what: str) -> None:
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise InfscaledError(f"{what} needs an interactive terminal (stdin and stdout are not both a tty)")


def _tui(args: argparse.Namespace) -> int:
    # No torch on this path: the TUI imports only protocol, client and the token lookup.
    from infscaled.client import DEFAULT_CONTROLLER
    from infscaled.runner.jobcmd import resolve_token
    from infscaled.tui.app import TuiApp

    if args.tui_interval is not None and args.tui_interval <= 0:
        raise InfscaledError(f"--interval {args.tui_interval}: must be positive (seconds)")
    token = resolve_token(args.tui_token)
    _needs_terminal("infscaled tui")
    TuiApp(args.tui_controller or DEFAULT_CONTROLLER, token, interval_s=args.tui_interval, job=args.tui_job).run()
    return 0


def _up(args: argparse.Namespace, console: object, level: int) -> int:
    _check_workload_args(args)  # before torch is imported: a typo is answered at once
    ports = _port_range(args.edge_ports) if args.edge_ports else None
    from infscaled.runner.run import render_summary
    from infscaled.runner.up import run_up

    if args.tui:
        _needs_terminal("infscaled up --tui")
    result = run_up(args.job, requests=args.requests, rate=args.rate, verify=args.verify,
                    progress=not args.no_progress and not args.tui and sys.stdout.isatty(), log_level=level,
                    tui=args.tui, port_range=ports)
    if result is None:
        console.print("the TUI was closed before the workload finished: the job was stopped, no summary")  # type: ignore[attr-defined]
        return 0
    console.print(render_summary(result.summary))  # type: ignore[attr-defined]
    console.print(f"job {result.job_id}: first result {result.submit_to_first_result_s:.2f} s after submit")  # type: ignore[attr-defined]
    if args.json:
        doc = result.summary.to_json() | {"submit_to_first_result_s": result.submit_to_first_result_s}
        import json
        from pathlib import Path

        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if result.summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
