"""Inspect a model source (unit count, parameters per unit) in a short-lived child process.

The agent answers the controller's Inspect without importing torch itself: it runs
`python -m infscaled.worker.inspect SOURCE`, which builds the skeleton on the meta device
(no weight memory) and prints one JSON line, `InspectOutcome` as a dict, as its last line
of stdout. `inspect_in_subprocess` is that parent side (asyncio, torch-free, cancellable:
the child is killed when the caller gives up).

Error texts are those of `infscaled run` (`runner.launcher.prepare`) without its leading
"JOB_FILE: ", so a controller can prefix the job file it is planning.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import asdict, dataclass, field

from infscaled.config.messages import format_error, short_repr
from infscaled.config.model_checks import builtin_problem
from infscaled.worker.entry import _die_with_parent

# Stderr kept for the error text when the child dies without its JSON line.
_STDERR_TAIL_CHARS = 2000


@dataclass(frozen=True)
class InspectOutcome:
    """The fields of protocol.messages.InspectResult, less the request id."""

    ok: bool
    unit_count: int = 0
    unit_weights: list[int] = field(default_factory=list)
    error: str = ""


def unknown_builtin_error(source: str, names: tuple[str, ...]) -> str | None:
    """`infscaled run`'s message for a builtin name not in `names` (None when it is known)."""
    problem = builtin_problem(source, names)
    if problem is None:
        return None
    allowed, what = problem
    # format_error's "PATH: KEY = VALUE" head with no path: the key leads.
    return format_error(f"model.source = {short_repr(source)}", "", None, allowed, what)


def inspect_model(source: str) -> InspectOutcome:
    """Build `source`'s skeleton on meta and count its units (imports torch: child side)."""
    from infscaled.errors import ModelError
    from infscaled.models.builtins import BUILTIN_NAMES
    from infscaled.models.sources import resolve
    from infscaled.models.stage import skeleton

    error = unknown_builtin_error(source, BUILTIN_NAMES)
    if error is not None:
        return InspectOutcome(False, error=error)
    try:
        sk = skeleton(resolve(source))
    except ModelError as exc:
        return InspectOutcome(False, error=f"model.source = {source!r}: {exc}")
    return InspectOutcome(True, sk.unit_count, sk.unit_weights())


async def inspect_in_subprocess(source: str, timeout_s: float) -> InspectOutcome:
    """Run `inspect_model(source)` in a fresh interpreter; never raises for a bad model."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "infscaled.worker.inspect", source,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate()
    except TimeoutError:
        return InspectOutcome(False, error=f"inspecting {source!r} took longer than {timeout_s:g} s")
    finally:
        if proc.returncode is None:  # timed out or cancelled: no child outlives the question
            proc.kill()
            await proc.wait()
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        doc = json.loads(lines[-1])
        return InspectOutcome(bool(doc["ok"]), int(doc["unit_count"]), [int(w) for w in doc["unit_weights"]],
                              str(doc["error"]))
    except (IndexError, ValueError, KeyError, TypeError):
        tail = err.decode(errors="replace").strip()[-_STDERR_TAIL_CHARS:]
        return InspectOutcome(False, error=f"inspecting {source!r} failed (exit code {proc.returncode}): {tail}")


def _main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the agent, which kills us
    _die_with_parent()
    if len(argv) != 1:
        print("usage: python -m infscaled.worker.inspect SOURCE", file=sys.stderr)
        return 2
    try:
        outcome = inspect_model(argv[0])
    except Exception as exc:  # noqa: BLE001 - process boundary: any failure is the answer
        outcome = InspectOutcome(False, error=f"model.source = {argv[0]!r}: {type(exc).__name__}: {exc}")
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), ("\n" + json.dumps(asdict(outcome)) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
