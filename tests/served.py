"""`infscaled serve JOB` as a subprocess for tests driving it with third-party clients, and the
README's marked examples (`<!-- readme-test: KIND -->` before a fenced block)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cluster import alive, cmdline, descendants, free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
INFSCALED_CMD = f"{sys.executable} -m infscaled.cli"
_BLOCK = re.compile(r"<!-- readme-test: (\w+) -->\s*```(\w+)\n(.*?)```", re.S)
SERVE_TIMEOUT_S = 240.0


@dataclass(frozen=True)
class Example:
    kind: str  # "serve" (the command that starts the job) or "client" (run against it)
    lang: str  # "sh" | "python"
    code: str


def readme_examples(text: str | None = None) -> list[Example]:
    return [Example(*m.groups()) for m in _BLOCK.finditer(README.read_text() if text is None else text)]


def localise(code: str, port: int) -> str:
    """The README's commands as this checkout runs them: the package from the working tree
    (not a .venv's install) and the test's port instead of 8470."""
    return code.replace(".venv/bin/infscaled", INFSCALED_CMD).replace("127.0.0.1:8470", f"127.0.0.1:{port}")


@dataclass
class Served:
    url: str
    port: int
    model: str
    env: dict[str, str]
    proc: subprocess.Popen[str]
    output: list[str]

    def token(self) -> str:
        out = subprocess.run([sys.executable, "-m", "infscaled.cli", "token"], env=self.env, capture_output=True,
                             text=True, check=True, timeout=60)
        return out.stdout.strip()


@contextmanager
def serve(command: str, state_dir: Path) -> Iterator[Served]:
    """Start `command` (an `infscaled serve ...` line), wait for its "serving" lines, yield; then
    Ctrl-C it and check it exits 0 with no process left behind."""
    port = free_port()
    env = {**os.environ, "INFSCALED_STATE_DIR": str(state_dir), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("INFSCALED_TOKEN", None)
    proc = subprocess.Popen(f"exec {localise(command, port)} --port {port}", shell=True, env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()
    output: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    everything: set[int] = set()
    try:
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        model = ""
        while not model:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "serve exited early:\n" + "".join(output)
            if m := re.match(r"\s+model:\s+(\S+)", line):
                model = m.group(1)
        everything = descendants([proc]) | {proc.pid}
        yield Served(f"http://127.0.0.1:{port}", port, model, env, proc, output)
    finally:
        everything |= descendants([proc])
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = None
        deadline = time.monotonic() + 15
        while any(alive(p) for p in everything) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = {p: cmdline(p) for p in everything if alive(p)}
        for pid in left:
            os.kill(pid, signal.SIGKILL)  # only processes this test started
        assert rc == 0 and not left, f"serve exited {rc}, left {left}:\n" + "".join(output)
