"""Members start as forks of a warm server (worker/start.py): same environment, own name, fast."""

from __future__ import annotations

import os
import sys
from multiprocessing.connection import Connection

import psutil
import pytest

from infscaled.worker.start import member_context, member_main, prestart

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
