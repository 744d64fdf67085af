"""How a supervisor starts its member processes: forks of one warm server (no torch here).

A stage worker used to start as a fresh interpreter ("spawn") that imported torch,
transformers and the stage code before it could build anything: 2-5 s of CPU per process on
the 2-core CI VM, 8-9 s from a kill to a replacement serving on a quiet one (BENCHMARKS.md
section 19). Now every supervisor process (`infscaled run`, an agent) keeps one multiprocessing
*fork server* that imported those modules once (`worker/preload.py`); a member is a fork of it,
started in ~0.05 s, and shares the imported code's memory copy-on-write. The server holds no
CUDA context, no threads of ours and no job state: it only forks.

What a fork server changes, and how it is kept the same as a fresh process:
- Standard output and error: the server's are the supervisor's at the server's start; each
  member gets the supervisor's *current* ones (`Stdio`, passed as file descriptors with the
  start), so a supervisor that redirected them (a log file, a test's capture) keeps its members'
  output.
- Environment: the server's is the supervisor's at the server's start. `member_main` applies
  the supervisor's environment as it was when the member was started, so a variable set later
  (`INFSCALED_METRICS`, `INFSCALED_WORKER_THREADS`, ...) reaches the member as before. (Variables
  read while torch is *imported* come from the server's start.) The working directory and
  `sys.path` travel with every start (multiprocessing's preparation data).
- Parenthood: a member's parent is the server, which exits when its supervisor does; members die
  with it (PR_SET_PDEATHSIG, set by each member) and end on their control pipe's EOF anyway.
  A server that dies (killed) takes its members with it: each is reported as exited, like any
  death, and the next start brings up a new server.
- Names: a member sets its process name (`ps -e`, `top`, psutil's `name()`) to
  `infscaled-NODE`, e.g. `infscaled-1.0` or `infscaled-dispa` (the kernel keeps 15 bytes);
  its command line is the server's.
Where no fork server exists (Windows), members are spawned as before.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from typing import Any

log = logging.getLogger(__name__)

PRELOAD_MODULE = "infscaled.worker.preload"
NAME_PREFIX = "infscaled-"

_lock = threading.Lock()
_context: BaseContext | None = None


def member_context() -> BaseContext:
    """The multiprocessing context members start from (the fork server's, once configured)."""
    global _context
    with _lock:
        if _context is None:
            if "forkserver" in mp.get_all_start_methods():
                ctx = mp.get_context("forkserver")
                ctx.set_forkserver_preload([PRELOAD_MODULE])
                _context = ctx
            else:
                _context = mp.get_context("spawn")
        return _context


class Stdio:
    """The supervisor's stdout and stderr as they are when a member starts (pickled as file
    descriptors that travel with the start: multiprocessing's DupFd)."""

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        from multiprocessing.reduction import DupFd

        return _stdio_in_child, (DupFd(1), DupFd(2))


def _stdio_in_child(out: Any, err: Any) -> tuple[int, int]:
    return out.detach(), err.detach()


def member_main(target: Callable[[Any, Connection], None], env: dict[str, str], name: str, spec: Any,
                conn: Connection, stdio: tuple[int, int] | None = None) -> None:
    """A member's first call in its own process: the supervisor's output, environment and its
    name, then `target`."""
    if stdio is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, into in zip(stdio, (1, 2), strict=True):
            os.dup2(fd, into)
            os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    set_process_name(NAME_PREFIX + name)
    target(spec, conn)


def member_args(target: Callable[[Any, Connection], None], name: str, spec: Any,
                conn: Connection) -> tuple[Any, ...]:
    """`member_main`'s arguments for starting `target` now: the environment and (from a fork
    server) the output of this moment."""
    stdio = Stdio() if member_context().get_start_method() == "forkserver" else None
    return (target, dict(os.environ), name, spec, conn, stdio)


PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15


def prctl(option: int, arg: int | bytes) -> None:
    """Linux's prctl(2) for this process; nothing elsewhere."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, arg, 0, 0, 0)


def set_process_name(name: str) -> None:
    """The kernel's name of this process (Linux; 15 bytes kept), so `ps -e` tells members apart."""
    prctl(PR_SET_NAME, name.encode()[:15])


def _noop() -> None:
    return None


def prestart() -> float:
    """Start the fork server and wait until it has imported the stage code (blocking: call it from
    a thread). Returns the seconds it took; 0 where members are spawned. A supervisor calls it once
    at its own start, so its first member does not wait for the imports (the agent does, before it
    registers: its event loop never blocks on them)."""
    ctx = member_context()
    if ctx.get_start_method() != "forkserver":
        return 0.0
    started = time.monotonic()
    proc = ctx.Process(target=_noop, name="infscaled-prestart", daemon=False)
    proc.start()  # returns once the server answered: it preloads before it accepts
    proc.join()
    took = time.monotonic() - started
    log.info("fork server ready in %.1f s", took)
    return took
