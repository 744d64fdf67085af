"""Assign a device to every stage replica."""

from __future__ import annotations

import re
from collections.abc import Sequence

_DEVICE = re.compile(r"cpu|cuda:\d+")


def place(devices: Sequence[str] | str, replicas: Sequence[int], available_cuda: int = 0) -> tuple[str, ...]:
    """One device per stage replica, in stage-major order (0.0, 0.1, 1.0, ...).

    `devices` is "auto" (round-robin over cuda:0..cuda:{available_cuda-1}, or all "cpu" when no
    GPU is available), a single device string applied to every replica, or an explicit list with
    exactly one entry per replica. "cuda" means "cuda:0". Explicit indices are not checked
    against `available_cuda`: the workers may run on another host than the planner.

    Raises ValueError on a malformed device or a list of the wrong length.
    """
    if any(count < 1 for count in replicas):
        raise ValueError(f"every stage needs at least one replica, got {list(replicas)}")
    workers = sum(replicas)
    if isinstance(devices, str):
        if devices == "auto":
            if available_cuda > 0:
                return tuple(f"cuda:{i % available_cuda}" for i in range(workers))
            return ("cpu",) * workers
        return (normalise_device(devices),) * workers
    if len(devices) != workers:
        raise ValueError(
            f"{len(devices)} devices given for {workers} stage replicas {list(replicas)}; "
            f"give one device per replica (stage-major), one device for all, or 'auto'"
        )
    return tuple(normalise_device(d) for d in devices)


def normalise_device(device: str) -> str:
    """"cpu" or "cuda:N" ("cuda" becomes "cuda:0"); ValueError otherwise."""
    text = device.strip().lower()
    if text == "cuda":
        text = "cuda:0"
    if not _DEVICE.fullmatch(text):
        raise ValueError(f"bad device {device!r}; allowed: 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return text
