"""A stranger on the data plane: connects to the ports it is aimed at, from its own threads,
and tries what someone without the job's secret can try (benchmarks/dataplane_bench.py, and
tests/test_hostile_dataplane.py).

    python -m benchmarks.stranger --ports 29500,29501 --seconds 10   # prints what it saw, as JSON
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import signal
import socket
import threading
from collections import Counter
from collections.abc import Iterable
from hashlib import sha256

from infscaled.protocol.wire import DATA, Header, encode_header
from infscaled.worker import edgeauth

HOST = "127.0.0.1"


class Stranger:
    """Attacks the ports it is given from its own threads until stopped, cycling through: a silent
    connection (held), a wrong secret, garbage bytes, a valid wire header, and bursts of
    connections. Counts what the listeners did to each attempt."""

    MODES = ("silent", "wrong_secret", "garbage", "wire_header")

    def __init__(self, burst: int = 150) -> None:
        self.burst = burst
        self.targets: list[int] = []
        self.seen: Counter[str] = Counter()
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(2)]

    def aim(self, ports: Iterable[int]) -> None:
        with self._lock:
            self.targets = sorted(set(ports))

    def __enter__(self) -> Stranger:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        for s in self._held:
            s.close()

    def _count(self, what: str) -> None:
        with self._lock:
            self.seen[what] += 1

    def _run(self, which: int) -> None:
        rounds = 0
        while not self._stop.is_set():
            with self._lock:
                ports = list(self.targets)
            for port in ports:
                if which == 0:
                    for mode in self.MODES:
                        self._attempt(port, mode)
                elif rounds % 5 == 0:
                    self._flood(port)
            rounds += 1
            self._stop.wait(0.02)

    def _attempt(self, port: int, mode: str) -> None:
        try:
            sock = socket.create_connection((HOST, port), timeout=2)
        except OSError:
            self._count("not listening")
            return
        try:
            hello = sock.recv(edgeauth.HELLO_BYTES)
            if not hello.startswith(edgeauth.MAGIC):
                self._count("no hello")
                sock.close()
                return
            self._count("listener reached")
            if mode == "silent":
                self._held.append(sock)  # never proves anything: the listener must drop it
                if len(self._held) > 64:
                    self._held.pop(0).close()
                return
            if mode == "wrong_secret":
                mine = os.urandom(32)
                sock.sendall(edgeauth.MAGIC + mine + hmac.new(b"guess", mine, sha256).digest())
            elif mode == "garbage":
                sock.sendall(os.urandom(600))
            else:
                sock.sendall(encode_header(Header(DATA, 1, 0, ())))
            sock.settimeout(5)
            if sock.recv(64) == b"":
                self._count(f"{mode} closed by the listener")
            sock.close()
        except OSError:
            self._count(f"{mode} reset")
            sock.close()

    def _flood(self, port: int) -> None:
        socks = []
        for _ in range(self.burst):
            try:
                socks.append(socket.create_connection((HOST, port), timeout=1))
            except OSError:
                break
        with self._lock:
            self.seen["flood connections"] += len(socks)
        self._stop.wait(0.5)
        for s in socks:
            s.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", required=True, help="comma-separated ports on 127.0.0.1")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--burst", type=int, default=150, help="connections per flood burst")
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # stop early, still report
    with Stranger(args.burst) as stranger:
        stranger.aim(int(p) for p in args.ports.split(","))
        stop.wait(args.seconds)
    print(json.dumps(dict(stranger.seen)), flush=True)


if __name__ == "__main__":
    main()
