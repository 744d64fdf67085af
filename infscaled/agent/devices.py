"""What this host offers: accelerators (NVML, else nvidia-smi) or CPU slots, cores and RAM (no torch).

`discover` may run a subprocess (nvidia-smi): call it in a thread from asyncio code.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from typing import Any

import psutil

from infscaled.protocol.messages import Device, DeviceUsage, HostMetrics

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


class UsageSampler:
    """The host's CPU and RAM (psutil) and each GPU's utilisation and memory (NVML when it works).

    NVML is initialised once and kept: a sample is then a few cheap driver queries. `sample`
    blocks briefly (driver calls): call it in a thread from asyncio code. CPU slots are not
    measured per device (a worker's threads float over the cores); they report -1.
    """

    def __init__(self, devices: list[Device]) -> None:
        self.devices = devices
        self._nvml: Any = None
        self._handles: dict[str, Any] = {}
        psutil.cpu_percent(None)  # primes the counter: the first real sample covers one interval
        if any(d.kind == "cuda" for d in devices):
            self._open_nvml()

    def _open_nvml(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = {d.id: pynvml.nvmlDeviceGetHandleByIndex(int(d.id.partition(":")[2]))
                             for d in self.devices if d.kind == "cuda"}
            self._nvml = pynvml
        except Exception as exc:  # noqa: BLE001 - ImportError or NVML's own errors: usage unmeasured
            log.info("GPU usage not measured: NVML unavailable (%s)", exc)

    def sample(self, agent_id: str) -> HostMetrics:
        ram = psutil.virtual_memory()
        usage = []
        for d in self.devices:
            util, used = -1.0, -1
            handle = self._handles.get(d.id)
            if handle is not None:
                try:
                    util = self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
                    used = int(self._nvml.nvmlDeviceGetMemoryInfo(handle).used)
                except Exception as exc:  # noqa: BLE001 - a GPU that fell off the bus must not stop the agent
                    log.warning("NVML query of %s failed: %s", d.id, exc)
            usage.append(DeviceUsage(d.id, util, used))
        return HostMetrics(agent_id, psutil.cpu_percent(None) / 100.0, int(ram.total - ram.available), usage)

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
            self._nvml = None


# A host sample is sent only when something moved at least this much since the last one sent:
# the controller keeps the latest, so an unchanged value needs no refresh, and a busy fleet's
# jitter below these steps would only cost the controller decoding.
CPU_STEP = 0.05  # busy fraction
UTIL_STEP = 0.05  # GPU busy fraction
MEMORY_STEP = 0.02  # of the previous value (RAM, GPU memory)


def usage_changed(sent: HostMetrics | None, new: HostMetrics) -> bool:
    """Whether `new` is worth sending after `sent` (the last one the controller got, None at first)."""
    if sent is None or len(sent.devices) != len(new.devices):
        return True
    if abs(new.cpu_ratio - sent.cpu_ratio) >= CPU_STEP or _moved(sent.ram_used_bytes, new.ram_used_bytes):
        return True
    for old, cur in zip(sent.devices, new.devices, strict=True):
        if old.id != cur.id or abs(cur.util_ratio - old.util_ratio) >= UTIL_STEP:
            return True
        if _moved(old.memory_used_bytes, cur.memory_used_bytes):
            return True
    return False


def _moved(old: int, new: int) -> bool:
    if old < 0 or new < 0:  # "not measured" on one side only
        return (old < 0) != (new < 0)
    return abs(new - old) > MEMORY_STEP * max(old, 1)
