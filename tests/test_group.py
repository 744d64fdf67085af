"""WorkerGroup with small real member processes speaking the control-pipe protocol."""

from __future__ import annotations

import os
import signal
import threading
from multiprocessing.connection import Connection

from infscaled.protocol import control
from infscaled.protocol.plan import DISPATCHER, Node
from infscaled.worker.group import Member, WorkerGroup


def _member(spec: str, conn: Connection) -> None:
    """READY at once, then wait for StopWorker (or the supervisor's end)."""
    conn.send_bytes(control.encode(control.WorkerReady(spec, os.getpid(), "cpu", [], 0, 0.0)))
    try:
        while not isinstance(control.decode(conn.recv_bytes()), control.StopWorker):
            pass
    except EOFError:
        pass


def test_a_member_restarted_under_its_old_name_is_watched_every_time() -> None:
    # The dispatcher service comes back under its old name after each loss. The supervisor must
    # watch each new process: it once tracked handles by id() alone, and a freed handle's id
    # reused by a new one left a restarted dispatcher "starting" for ever (seen once in the daemon
    # chaos run; whether an id is reused depends on the allocator, so this checks the contract).
    ready: list[int] = []
    exits: list[tuple[Node, int | None, str]] = []
    changed = threading.Condition()

    def on_ready(node: Node, msg: control.WorkerReady) -> None:
        with changed:
            ready.append(msg.pid)
            changed.notify_all()

    def on_exit(node: Node, code: int | None, reason: str) -> None:
        with changed:
            exits.append((node, code, reason))
            changed.notify_all()

    group = WorkerGroup("restarts", [Member(DISPATCHER, _member, "dispatcher")], 60,
                        on_ready=on_ready, on_exit=on_exit)
    group.tolerate_exits = True
    group.start()
    try:
        for i in range(12):
            with changed:
                assert changed.wait_for(lambda: len(ready) == i + 1, 60), f"start {i + 1}: never READY"
            os.kill(ready[-1], signal.SIGKILL)
            with changed:
                assert changed.wait_for(lambda: len(exits) == i + 1, 60), f"start {i + 1}: exit not seen"
            assert exits[-1][1] == -signal.SIGKILL and "exited with code -9" in exits[-1][2]
            group.add(Member(DISPATCHER, _member, "dispatcher"))
        with changed:
            assert changed.wait_for(lambda: len(ready) == 13, 60)
        assert len(set(ready)) == 13  # thirteen distinct processes
        assert group.failure is None  # tolerated: a recovering supervisor decides
    finally:
        group.stop(5.0, first=[DISPATCHER])
    assert group.all_exited
