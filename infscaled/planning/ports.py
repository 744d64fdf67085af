"""Find free TCP ports for edge stores (not pure: it opens sockets)."""

from __future__ import annotations

import os
import random
import socket
from contextlib import ExitStack
from pathlib import Path

from infscaled.errors import InfscaledError

# Where `infscaled run` looks for ports: below the kernel's ephemeral range (Linux default
# 32768-60999) and below the agents' default edge range (29500-29999) and the test clusters'
# (20000+). A port picked from the ephemeral range can be taken, between the pick and the
# worker's bind, by any outgoing connection on the host (a gloo pair opens several per edge):
# seen as EADDRINUSE in CI. Ports below the range are only ever taken by an explicit bind.
PICK_RANGE = (10_000, 20_000)
# FIRST-LAST overrides PICK_RANGE: two `infscaled run` on one host (or the two workers of
# `make test`) given disjoint ranges never pick the same port between pick and bind.
PORTS_ENV = "INFSCALED_RUN_PORTS"
_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def run_port_range() -> tuple[int, int]:
    """Where `infscaled run` picks edge ports: $INFSCALED_RUN_PORTS (FIRST-LAST), else PICK_RANGE."""
    text = os.environ.get(PORTS_ENV, "").strip()
    if not text:
        return PICK_RANGE
    first, _, last = text.partition("-")
    if not (first.isdigit() and last.isdigit() and 1 <= int(first) <= int(last) <= 65535):
        raise InfscaledError(f"${PORTS_ENV} = {text!r}: expected FIRST-LAST with 1 <= FIRST <= LAST <= 65535, "
                             f"e.g. 10000-14999")
    return int(first), int(last) + 1


def ephemeral_low() -> int:
    """The lowest port the kernel hands out to outgoing connections (32768 where unknown)."""
    try:
        return int(_EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(n: int, host: str = "127.0.0.1", pick_range: tuple[int, int] | None = None) -> list[int]:
    """`n` distinct TCP ports that were free on `host` a moment ago, from `pick_range` (default
    `run_port_range()`; the end excluded), clipped below the ephemeral range.

    All sockets stay bound until every port is picked, so no port is returned twice. Another
    process may still bind a port before its user does; callers treat a failed bind as a normal
    start-up error.
    """
    if n < 0:
        raise ValueError(f"cannot pick {n} ports")
    pick_range = pick_range or run_port_range()
    low, high = pick_range[0], min(pick_range[1], ephemeral_low())
    if high - low < n:
        raise ValueError(f"cannot pick {n} ports from {low}-{high - 1}")
    rng = random.Random()  # seeded from the OS: concurrent runs start from different ports
    with ExitStack() as stack:
        ports: list[int] = []
        for port in rng.sample(range(low, high), high - low):
            if len(ports) == n:
                break
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind((host, port))
            except OSError:
                sock.close()
                continue
            stack.enter_context(sock)
            ports.append(port)
    if len(ports) < n:
        raise OSError(f"only {len(ports)} of {n} ports free in {low}-{high - 1} on {host}")
    return ports
