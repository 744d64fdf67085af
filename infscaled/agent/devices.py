"""What this host offers: accelerators (NVML, else nvidia-smi) or CPU slots, cores and RAM (no torch).

`discover` may run a subprocess (nvidia-smi): call it in a thread from asyncio code.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess

import psutil

from infscaled.protocol.messages import Device

log = logging.getLogger(__name__)

NVIDIA_SMI_TIMEOUT_S = 10.0
_CPU = re.compile(r"cpu:(\d+)")
_CUDA = re.compile(r"cuda:(\d+)")


def parse_devices(spec: str) -> tuple[str, list[int]]:
    """("auto", []), ("cpu", [N]) or ("cuda", [indices]); ValueError says what is wrong."""
    text = spec.strip().lower()
    if text == "auto":
        return "auto", []
    if m := _CPU.fullmatch(text):
        if int(m.group(1)) < 1:
            raise ValueError("cpu:N needs N >= 1")
        return "cpu", [int(m.group(1))]
    parts = [p.strip() for p in text.split(",")]
    indices = []
    for p in parts:
        m = _CUDA.fullmatch(p)
        if m is None:
            raise ValueError(f"{p!r} is not a device")
        indices.append(int(m.group(1)))
    if len(set(indices)) != len(indices):
        raise ValueError("a cuda device is listed twice")
    return "cuda", indices


def discover(spec: str) -> list[Device]:
    """The devices to register, per `spec` (see parse_devices); ValueError for a missing GPU."""
    kind, args = parse_devices(spec)
    if kind == "cpu":
        return cpu_slots(args[0])
    gpus = _nvml_gpus()
    if gpus is None:
        gpus = _nvidia_smi_gpus()
    if kind == "auto":
        return gpus if gpus else cpu_slots(os.cpu_count() or 1)
    if gpus is None:  # nothing to check against: trust the operator
        return [Device(f"cuda:{i}", "cuda") for i in args]
    found = {d.id: d for d in gpus}
    missing = [f"cuda:{i}" for i in args if f"cuda:{i}" not in found]
    if missing:
        raise ValueError(f"{', '.join(missing)} not found; this host has: {', '.join(found) or 'no GPU'}")
    return [found[f"cuda:{i}"] for i in args]


def cpu_slots(n: int) -> list[Device]:
    return [Device(f"cpu:{i}", "cpu", "cpu") for i in range(n)]


def host_resources() -> tuple[int, int]:
    """(logical CPU cores, total RAM in bytes)."""
    return psutil.cpu_count(logical=True) or os.cpu_count() or 1, int(psutil.virtual_memory().total)


def _nvml_gpus() -> list[Device] | None:
    """GPUs through NVML, or None when pynvml is missing or NVML does not work here."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            gpus = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(handle)
                name = name.decode() if isinstance(name, bytes) else str(name)
                total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
                gpus.append(Device(f"cuda:{i}", "cuda", name, total))
            return gpus
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 - NVML raises its own error types; any means "no NVML"
        log.info("NVML unavailable (%s); trying nvidia-smi", exc)
        return None


def _nvidia_smi_gpus() -> list[Device] | None:
    """GPUs from `nvidia-smi --query-gpu`, or None when it is not on PATH or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("nvidia-smi failed (%s)", exc)
        return None
    return parse_nvidia_smi(out)


def parse_nvidia_smi(text: str) -> list[Device]:
    """Parse `index, name, memory.total [MiB]` lines; lines that do not parse are skipped."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or not parts[0].isdigit():
            continue
        index, name, memory = parts[0], ",".join(parts[1:-1]), parts[-1]
        mib = int(memory) if memory.isdigit() else 0
        gpus.append(Device(f"cuda:{index}", "cuda", name, mib << 20))
    return gpus
