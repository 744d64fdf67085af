"""`infscaled run` end to end, as a user runs it: real subprocesses of the console script.

Every test starts the launcher through `Launched`, which collects its output in reader threads
and records every descendant process in a monitor thread, so a test can wait on output or on
processes (with timeouts, never plain sleeps) and the `launch` fixture can kill all of it after.
Worker processes are recognised by the name they give themselves (`infscaled-NODE`: tests/cluster.is_member).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from cluster import is_member

REPO = Path(__file__).resolve().parents[1]
INFSCALED = REPO / ".venv" / "bin" / "infscaled"
QUICKSTART = REPO / "configs" / "jobs" / "quickstart.toml"
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
# The rich progress bar shows "DONE/TOTAL"; any DONE > 0 means every worker is READY and serving.
SERVING = r"\b[1-9]\d*/100000\b"

pytestmark = pytest.mark.skipif(not INFSCALED.exists(), reason=f"{INFSCALED} not installed")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("COLUMNS", None)
    env.update(extra)
    return env


def _alive(p: psutil.Process) -> bool:
    """Running and not a zombie (an orphan reparented to a non-reaping init stays a zombie)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _poll_until(pred: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll an observable condition (process table) until it holds or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    tick = threading.Event()
    while not pred():
        if time.monotonic() >= deadline:
            return False
        tick.wait(interval_s)
    return True


class Launched:
    """One `infscaled` process: output read by threads, descendants recorded by a monitor thread."""

    def __init__(self, args: list[str], cwd: Path, *, tty: bool = False, env: dict[str, str] | None = None):
        self._cond = threading.Condition()
        self._buf: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self._members: set[int] = set()  # pids of workers and dispatchers (tests/cluster.is_member)
        self.seen: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        slave = None
        if tty:  # stdout on a pseudo-terminal, so the launcher shows its progress bar
            master, slave = pty.openpty()
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.started = time.monotonic()
        self.proc = subprocess.Popen([str(INFSCALED), *args], cwd=cwd, env=env or _env(),
                                     stdin=subprocess.DEVNULL, stdout=slave if tty else subprocess.PIPE,
                                     stderr=subprocess.PIPE, preexec_fn=_interruptible)
        if slave is not None:
            os.close(slave)
            self._fds = {"stdout": master}
        else:
            assert self.proc.stdout is not None
            self._fds = {"stdout": self.proc.stdout.fileno()}
        assert self.proc.stderr is not None
        self._fds["stderr"] = self.proc.stderr.fileno()
        self._ps = psutil.Process(self.proc.pid)
        self._readers = [threading.Thread(target=self._read, args=(name,), daemon=True) for name in self._fds]
        self._monitor = threading.Thread(target=self._watch, daemon=True)
        for t in [*self._readers, self._monitor]:
            t.start()

    # -- threads -----------------------------------------------------------------------------------

    def _read(self, name: str) -> None:
        # EOF (or EIO on a pty) only once every holder of the write end is gone: workers too.
        while True:
            try:
                chunk = os.read(self._fds[name], 65536)
            except OSError:
                chunk = b""
            with self._cond:
                self._buf[name] += chunk
                self._cond.notify_all()
            if not chunk:
                return

    def _watch(self) -> None:
        while self.proc.poll() is None and not self._stop.is_set():
            try:
                children = self._ps.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            with self._cond:
                for c in children:
                    self.seen.setdefault(c.pid, c)
                    # A member names itself just after it starts: look again until it has.
                    if c.pid not in self._members and is_member(c):
                        self._members.add(c.pid)
                self._cond.notify_all()
            self._stop.wait(0.02)

    # -- queries -----------------------------------------------------------------------------------

    def _text(self, name: str) -> str:
        return ANSI.sub("", self._buf[name].decode(errors="replace")).replace("\r", "")

    @property
    def stdout(self) -> str:
        with self._cond:
            return self._text("stdout")

    @property
    def stderr(self) -> str:
        with self._cond:
            return self._text("stderr")

    @property
    def output(self) -> str:
        return self.stdout + "\n" + self.stderr

    def workers(self) -> list[psutil.Process]:
        with self._cond:
            return [p for pid, p in self.seen.items() if pid in self._members]

    def wait_output(self, pattern: str, timeout_s: float) -> re.Match[str]:
        found: list[re.Match[str]] = []

        def match() -> bool:
            m = re.search(pattern, self._text("stdout") + "\n" + self._text("stderr"))
            if m:
                found.append(m)
            return m is not None or self.proc.poll() is not None

        with self._cond:
            self._cond.wait_for(match, timeout_s)
        if not found:
            pytest.fail(f"no {pattern!r} within {timeout_s} s (exit code {self.proc.poll()}); output:\n"
                        f"{self.output[-3000:]}")
        return found[0]

    def wait_exit(self, timeout_s: float) -> int:
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"launcher still running after {timeout_s} s; output:\n{self.output[-3000:]}")
        for t in self._readers:  # the rest of its output; workers share the pipes, so give them time
            t.join(15.0)
        return code

    def kill_all(self) -> None:
        """SIGKILL the launcher and every descendant ever seen; reap the launcher; close our ends."""
        self._stop.set()
        for p in [self._ps, *self.seen.values()]:
            if _alive(p):
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
        try:
            self.proc.wait(10.0)
        except subprocess.TimeoutExpired:
            pass
        self._monitor.join(5.0)
        for name, fd in self._fds.items():
            if name == "stdout" and self.proc.stdout is None:
                try:
                    os.close(fd)  # the pty master
                except OSError:
                    pass
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


def _interruptible() -> None:
    """The launcher takes Ctrl-C as it would at a terminal, even where the test runner's own
    parent ignores SIGINT (a background shell, some xdist set-ups): an ignored SIGINT is inherited."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Launched]]:
    started: list[Launched] = []

    def start(*args: str | Path, tty: bool = False, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> Launched:
        launched = Launched([str(a) for a in args], cwd or tmp_path, tty=tty, env=env)
        started.append(launched)
        return launched

    try:
        yield start
    finally:
        for launched in started:
            launched.kill_all()


def _write(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _flat(text: str) -> str:
    """rich wraps long lines for a non-terminal; join them back for substring checks."""
    return " ".join(text.split())


def _serving(launch: Callable[..., Launched], *extra: str, job_file: Path = QUICKSTART
             ) -> tuple[Launched, list[psutil.Process]]:
    """A quickstart run with many requests, waited on until requests complete; and its 3 workers."""
    job = launch("run", job_file, "--requests", "100000", *extra, tty=True, env=_env(COLUMNS="200"))
    job.wait_output(SERVING, timeout_s=90)
    workers = [w for w in job.workers() if _alive(w)]
    assert len(workers) == 3, f"expected 3 live workers, saw {job.workers()}"
    return job, workers


def _assert_gone(procs: list[psutil.Process], timeout_s: float, why: str) -> None:
    if not _poll_until(lambda: not any(_alive(p) for p in procs), timeout_s):
        left = [(p.pid, p.status()) for p in procs if _alive(p)]
        pytest.fail(f"{why}: processes still alive after {timeout_s} s: {left}")


# -- a successful run ------------------------------------------------------------------------------


def test_quickstart_run_writes_summary_and_json(launch: Callable[..., Launched], tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    job = launch("run", QUICKSTART, "--requests", "60", "--verify", "--json", out)
    code = job.wait_exit(120)
    assert code == 0, job.output
    doc = json.loads(out.read_text())
    assert doc["completed"] == 60 and doc["failed"] == 0
    assert doc["throughput_rps"] > 0 and doc["samples_per_s"] > 0
    lat = doc["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    stages = {(s["stage"], s["replica"]): s for s in doc["stages"]}
    assert set(stages) == {(0, 0), (1, 0), (1, 1)}
    assert all(0.0 <= s["busy"] <= 1.0 for s in stages.values())
    assert doc["verify"]["checked"] == 60 and doc["verify"]["mismatched"] == 0
    assert doc["verify"]["max_abs_err"] < 1e-4
    assert "failure" not in doc
    assert "requests completed" in job.stdout and "stage.replica" in job.stdout
    _assert_gone(job.workers(), 5, "workers after a clean run")


# -- input errors: exit 2, a clear message, no worker started -------------------------------------


def _rejected(launch: Callable[..., Launched], *args: str | Path, timeout_s: float = 20) -> str:
    job = launch(*args)
    code = job.wait_exit(timeout_s)
    assert code == 2, job.output
    assert job.workers() == [], "a worker was started for rejected input"
    assert "Traceback" not in job.stderr
    return _flat(job.stderr)


def test_bad_policy_is_rejected_before_any_worker(launch: Callable[..., Launched], tmp_path: Path) -> None:
    path = _write(tmp_path, '[model]\nsource = "builtin:gpt2-tiny"\n\n[pipeline]\nstages = 2\n'
                            'policy = "fastest"\n', "bad-policy.toml")
    started = time.monotonic()
    err = _rejected(launch, "run", path.name, timeout_s=10)
    assert time.monotonic() - started < 10
    assert "bad-policy.toml" in err
    assert "pipeline.policy" in err and "'fastest'" in err and "allowed" in err
    assert "round_robin" in err


def test_layers_beyond_model_units_are_rejected(launch: Callable[..., Launched], tmp_path: Path) -> None:
    # builtin:gpt2-tiny has 6 units, 0..5.
    path = _write(tmp_path, '[model]\nsource = "builtin:gpt2-tiny"\n\n[pipeline]\n'
                            'layers = [[0, 2], [3, 9]]\n', "layers.toml")
    err = _rejected(launch, "run", path.name)
    assert "layers.toml" in err and "pipeline.layers" in err
    assert "unit 9 does not exist" in err and "6 units" in err


def test_missing_model_directory_is_rejected(launch: Callable[..., Launched], tmp_path: Path) -> None:
    path = _write(tmp_path, '[model]\nsource = "./no-such-model"\n\n[pipeline]\nstages = 2\n', "nodir.toml")
    err = _rejected(launch, "run", path.name)
    assert "nodir.toml" in err and "model.source" in err and "no such model directory" in err


@pytest.mark.parametrize(("args", "message"), [
    (["--requests", "0"], "--requests 0: must be at least 1"),
    (["--rate", "-1"], "--rate -1.0: must be 0 (closed loop) or positive"),
])
def test_bad_command_line_values_are_rejected(launch: Callable[..., Launched], args: list[str],
                                              message: str) -> None:
    assert message in _rejected(launch, "run", QUICKSTART, *args, timeout_s=10)


def test_error_text_is_not_read_as_markup(launch: Callable[..., Launched], tmp_path: Path) -> None:
    path = _write(tmp_path, '[model]\nsource = "builtin:gpt2-tiny"\n\n[pipeline]\nstages = 2\n'
                            'policy = "[/x]"\n', "markup.toml")
    assert "pipeline.policy = '[/x]'" in _rejected(launch, "run", path.name, timeout_s=10)


def test_error_names_a_long_path_intact(launch: Callable[..., Launched], tmp_path: Path) -> None:
    deep = tmp_path / ("jobs_" + "x" * 90)
    deep.mkdir()
    path = _write(deep, '[model]\nsource = "builtin:gpt2-tiny"\n\n[pipeline]\nstages = 2\n'
                        'policy = "fastest"\n', "bad.toml")
    job = launch("run", path)
    assert job.wait_exit(10) == 2
    assert f"{path}: pipeline.policy = 'fastest'" in job.stderr


# -- stopping and failures: never an orphan --------------------------------------------------------


def test_ctrl_c_stops_every_worker(launch: Callable[..., Launched]) -> None:
    job, workers = _serving(launch, "--rate", "0")
    job.proc.send_signal(signal.SIGINT)
    code = job.wait_exit(30)
    assert code == 130, job.output
    assert "interrupted" in job.stderr
    _assert_gone(workers, 5, "workers after Ctrl-C")


def test_launcher_sigkill_leaves_no_orphans(launch: Callable[..., Launched]) -> None:
    job, workers = _serving(launch, "--rate", "0")
    everything = list(job.seen.values())  # workers and multiprocessing's resource tracker
    job.proc.kill()
    assert job.wait_exit(10) == -signal.SIGKILL
    _assert_gone(everything, 15, "descendants after the launcher was SIGKILLed")


def _kill_one_worker(launch: Callable[..., Launched], tmp_path: Path, *extra: str) -> tuple[Launched, psutil.Process,
                                                                              list[psutil.Process]]:
    # With recovery on (the default) the run would replace the worker and go on (tests/test_recovery.py).
    job_file = _write(tmp_path, QUICKSTART.read_text() + "\n[recovery]\nenabled = false\n", "quickstart.toml")
    job, workers = _serving(launch, *extra, job_file=job_file)
    victim = max(workers, key=lambda p: p.pid)
    victim.kill()
    return job, victim, [w for w in workers if w.pid != victim.pid]


def test_worker_killed_mid_run_fails_the_job(launch: Callable[..., Launched], tmp_path: Path) -> None:
    job, victim, others = _kill_one_worker(launch, tmp_path, "--rate", "0")
    code = job.wait_exit(30)
    assert code not in (0, 2, 130) and code > 0, job.output
    out = _flat(job.output)
    m = re.search(rf"worker (\d\.\d) \(pid {victim.pid}\) exited", out)
    assert m and m.group(1) in {"0.0", "1.0", "1.1"}, out[-3000:]
    assert "requests failed" in out
    _assert_gone(others, 5, "surviving workers after a worker died")


def test_worker_killed_in_open_loop_fails_the_job_promptly(launch: Callable[..., Launched], tmp_path: Path) -> None:
    job, victim, others = _kill_one_worker(launch, tmp_path, "--rate", "50")
    try:
        code = job.proc.wait(15)
    except subprocess.TimeoutExpired:
        pytest.fail("launcher still pacing requests 15 s after a worker died")
    assert code == 1
    _assert_gone(others, 5, "surviving workers after a worker died")
