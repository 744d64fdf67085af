"""Members start as forks of a warm server (worker/start.py): same environment, own name, fast."""

from __future__ import annotations

import os
import sys
from multiprocessing.connection import Connection

import psutil
import pytest

from infscaled.worker.start import member_args, member_context, member_main, prestart

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process names are Linux's")


def _report(spec: str, conn: Connection) -> None:
    with open("/proc/self/comm") as f:
        comm = f.read().strip()
    conn.send((os.environ.get(spec), comm, os.getppid(), "torch" in sys.modules, os.getcwd()))


def test_a_member_gets_the_environment_of_its_start_its_name_and_the_preloaded_modules(
        tmp_path, monkeypatch) -> None:
    prestart()  # the server imports torch & co. now, before the variable below exists
    monkeypatch.setenv("INFSCALED_TEST_START", "set after the server started")
    monkeypatch.chdir(tmp_path)
    ctx = member_context()
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=member_main, args=(_report, dict(os.environ), "1.0", "INFSCALED_TEST_START", child))
    proc.start()
    value, comm, ppid, has_torch, cwd = parent.recv()
    proc.join(10)
    assert proc.exitcode == 0
    assert value == "set after the server started"
    assert comm == "infscaled-1.0"
    assert cwd == str(tmp_path)
    if ctx.get_start_method() == "forkserver":
        assert has_torch, "the fork server preloads torch: its members start with it imported"
        assert ppid != os.getpid() and "forkserver" in " ".join(psutil.Process(ppid).cmdline())


def _say(spec: str, conn: Connection) -> None:
    print(f"out {spec}", flush=True)
    print(f"err {spec}", file=sys.stderr, flush=True)
    conn.send("said")


def test_a_member_writes_to_the_supervisors_output_of_its_start(tmp_path) -> None:
    # The fork server's own stdout/stderr are the supervisor's when the server started; a member
    # started later writes where the supervisor's go now (a log file, a test's capture).
    prestart()
    ctx = member_context()
    saved = os.dup(1), os.dup(2)
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    try:
        with open(out, "wb") as fo, open(err, "wb") as fe:
            os.dup2(fo.fileno(), 1)
            os.dup2(fe.fileno(), 2)
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=member_main, args=member_args(_say, "0.0", "hello", child))
            proc.start()
            child.close()
            assert parent.recv() == "said"
            proc.join(10)
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
    assert proc.exitcode == 0
    assert out.read_text() == "out hello\n" and err.read_text() == "err hello\n"
