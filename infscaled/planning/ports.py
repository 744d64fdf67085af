"""Find free TCP ports for edge stores (not pure: it opens sockets)."""

from __future__ import annotations

import socket
from contextlib import ExitStack


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct TCP ports that were free on `host` a moment ago.

    All sockets stay bound until every port is picked, so the OS cannot hand out one port twice.
    Another process may still grab a port before its user binds it; callers treat a failed bind
    as a normal start-up error.
    """
    if n < 0:
        raise ValueError(f"cannot pick {n} ports")
    with ExitStack() as stack:
        ports = []
        for _ in range(n):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
    assert len(set(ports)) == n, "free_ports: the OS returned a port twice while all were bound"
    return ports
