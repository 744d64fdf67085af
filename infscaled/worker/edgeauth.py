"""Joining an edge: a listener bound to the node's own address, and a mutual HMAC handshake on
the job's secret before anything else is read.

The sender of an edge (rank 0) listens at `bind_host:port` (the address its agent advertises,
never every interface) only while the edge is being joined; once its peer proved itself the
listener is closed, so a serving job has no open data-plane port. The receiver (rank 1)
connects, retrying until the connect timeout.

Handshake (fixed sizes; nothing longer is ever read from an unproven connection):

    listener -> peer   MAGIC (8) + nonce_l (32)
    peer -> listener   MAGIC (8) + nonce_p (32) + HMAC-SHA256(secret, "dst|" key nonce_l nonce_p)
    listener -> peer   HMAC-SHA256(secret, "src|" key nonce_p nonce_l)

Both ends prove the secret, and the edge key is inside the MAC, so a proof for one edge (or
one job) opens no other. A connection that fails is closed at once; its reason is counted
(`refused()`) and logged once per (edge, reason), with a summary when the listener closes.

Bounds on what a stranger can hold: at most `MAX_PENDING` unproven connections per listening
edge (a newcomer beyond that evicts the oldest, so a flood cannot lock the real peer out), each
for at most `HANDSHAKE_S`; all handled by the one thread that is joining the edge (no thread per
connection). Connections waiting in the kernel's backlog hold no file descriptor of ours.
"""

from __future__ import annotations

import hmac
import logging
import os
import selectors
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from hashlib import sha256

from infscaled.errors import TransportError

log = logging.getLogger(__name__)

MAGIC = b"INFSEDG1"
NONCE_BYTES = 32
MAC_BYTES = 32
HELLO_BYTES = len(MAGIC) + NONCE_BYTES
PROOF_BYTES = len(MAGIC) + NONCE_BYTES + MAC_BYTES
HANDSHAKE_S = 5.0
"""An unproven connection is closed after this long (a real peer needs one round trip)."""
MAX_PENDING = 32
"""Unproven connections held per listening edge; more evict the oldest."""
BACKLOG = 64
ACCEPTS_PER_ROUND = 8
RETRY_MAX_S = 0.5

# Refusal reasons (the keys of refused()).
GARBAGE = "not the edge protocol"
WRONG_SECRET = "wrong secret"
TOO_SLOW = "no proof within the handshake time"
CLOSED_EARLY = "closed before proving"
EVICTED = "evicted by newer connections (too many unproven)"

_refused: Counter[str] = Counter()
_refused_lock = threading.Lock()


def refused() -> dict[str, int]:
    """Connections this process refused on its edge listeners, by reason (tests, stats)."""
    with _refused_lock:
        return dict(_refused)


def _mac(secret: bytes, role: bytes, key: str, first: bytes, second: bytes) -> bytes:
    return hmac.new(secret, role + b"|" + key.encode() + b"|" + first + second, sha256).digest()


def _tcp(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


@dataclass
class _Pending:
    sock: socket.socket
    addr: str
    nonce: bytes
    deadline: float
    got: bytearray = field(default_factory=bytearray)


class _Refusals:
    """One listener's refusals: the first of each reason is logged, all are counted."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.counts: Counter[str] = Counter()

    def add(self, reason: str, addr: str) -> None:
        with _refused_lock:
            _refused[reason] += 1
        self.counts[reason] += 1
        if self.counts[reason] == 1:
            log.warning("edge %s: refused a data-plane connection from %s: %s (further ones with this "
                        "reason are counted, not logged)", self.key, addr, reason)

    def summary(self) -> None:
        if self.counts:
            detail = ", ".join(f"{n} {why}" for why, n in self.counts.most_common())
            log.warning("edge %s: refused %d data-plane connection(s) while joining: %s",
                        self.key, sum(self.counts.values()), detail)


def listen(key: str, bind_host: str, port: int, secret: bytes, timeout_s: float) -> socket.socket:
    """The sender's side: accept connections at bind_host:port until one proves `secret` for
    edge `key`; return it (blocking, TCP_NODELAY). TransportError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    where = f"{bind_host}:{port}"
    try:
        server = socket.create_server((bind_host, port), family=_family(bind_host), backlog=BACKLOG)
    except OSError as e:
        raise TransportError(f"edge {key}: cannot host its listener at {where}: {e.strerror or e}") from e
    server.setblocking(False)
    refusals = _Refusals(key)
    pending: dict[socket.socket, _Pending] = {}
    sel = selectors.DefaultSelector()
    sel.register(server, selectors.EVENT_READ)

    def drop(p: _Pending, reason: str | None) -> None:
        sel.unregister(p.sock)
        del pending[p.sock]
        p.sock.close()
        if reason is not None:
            refusals.add(reason, p.addr)

    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise TransportError(f"edge {key}: no receiver joined at {where} within {timeout_s}s")
            for p in [p for p in pending.values() if p.deadline <= now]:
                drop(p, TOO_SLOW)
            wake = min([deadline, *(p.deadline for p in pending.values())])
            events = sel.select(max(wake - now, 0.0))
            # Proofs first, new connections last: a flood accepted in this round cannot evict a
            # peer whose proof is already here.
            events.sort(key=lambda ev: ev[0].fileobj is server)
            for sk, _ in events:
                if sk.fileobj is server:
                    _accept(server, pending, sel, refusals, drop)
                    continue
                p = pending.get(sk.fileobj)  # type: ignore[call-overload]
                if p is None:
                    continue
                verdict = _read_proof(p, key, secret)
                if verdict is None:
                    continue  # incomplete: wait for more
                if verdict:
                    drop(p, verdict)
                    continue
                sel.unregister(p.sock)
                del pending[p.sock]
                sock = p.sock
                try:
                    sock.setblocking(True)
                    sock.settimeout(HANDSHAKE_S)
                    sock.sendall(_mac(secret, b"src", key, p.got[len(MAGIC):HELLO_BYTES], p.nonce))
                    sock.settimeout(None)
                except OSError:
                    sock.close()
                    refusals.add(CLOSED_EARLY, p.addr)
                    continue
                return _tcp(sock)
    finally:
        for p in list(pending.values()):
            drop(p, None)
        sel.close()
        server.close()
        refusals.summary()


def _accept(server: socket.socket, pending: dict[socket.socket, _Pending], sel: selectors.BaseSelector,
            refusals: _Refusals, drop: object) -> None:
    # Accept a few per round (a flood drains the backlog, and proofs are read in between).
    for _ in range(ACCEPTS_PER_ROUND):
        try:
            sock, addr = server.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # EMFILE and the like: the process is out of descriptors; back off
            refusals.add(f"accept failed ({e.strerror or e})", "-")
            time.sleep(0.05)
            return
        if len(pending) >= MAX_PENDING:
            oldest = min(pending.values(), key=lambda q: q.deadline)
            drop(oldest, EVICTED)  # type: ignore[operator]
        nonce = os.urandom(NONCE_BYTES)
        sock.setblocking(False)
        try:
            sock.send(MAGIC + nonce)  # 40 bytes into an empty socket buffer: never partial
        except OSError:
            sock.close()
            refusals.add(CLOSED_EARLY, _addr(addr))
            continue
        p = _Pending(sock, _addr(addr), nonce, time.monotonic() + HANDSHAKE_S)
        pending[sock] = p
        sel.register(sock, selectors.EVENT_READ)


def _read_proof(p: _Pending, key: str, secret: bytes) -> str | None:
    """"" when the proof is right, a refusal reason when not, None while incomplete."""
    try:
        chunk = p.sock.recv(PROOF_BYTES - len(p.got))
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return CLOSED_EARLY
    if not chunk:
        return CLOSED_EARLY
    p.got += chunk
    # Reject garbage as soon as its first bytes differ: nothing past the magic is looked at.
    if p.got[:len(MAGIC)] != MAGIC[:len(p.got)]:
        return GARBAGE
    if len(p.got) < PROOF_BYTES:
        return None
    peer_nonce, proof = bytes(p.got[len(MAGIC):HELLO_BYTES]), bytes(p.got[HELLO_BYTES:])
    if not hmac.compare_digest(proof, _mac(secret, b"dst", key, p.nonce, peer_nonce)):
        return WRONG_SECRET
    return ""


def reach(key: str, host: str, port: int, secret: bytes, timeout_s: float) -> socket.socket:
    """The receiver's side: connect to host:port and run the handshake, retrying (the sender may
    not listen yet) until `timeout_s`; return the proven connection (blocking, TCP_NODELAY)."""
    deadline = time.monotonic() + timeout_s
    where = f"{host}:{port}"
    pause = 0.02
    last = "no attempt"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransportError(f"edge {key}: cannot reach its sender at {where} within {timeout_s}s: {last}")
        try:
            sock = socket.create_connection((host, port), timeout=min(left, HANDSHAKE_S))
        except OSError as e:
            last = e.strerror or str(e)
        else:
            try:
                return _prove(sock, key, secret)
            except (OSError, _HandshakeFailed) as e:
                sock.close()
                last = str(e) or type(e).__name__
        time.sleep(min(pause, max(deadline - time.monotonic(), 0.0)))
        pause = min(pause * 2, RETRY_MAX_S)


class _HandshakeFailed(Exception):
    pass


def _prove(sock: socket.socket, key: str, secret: bytes) -> socket.socket:
    hello = _read_exact(sock, HELLO_BYTES)
    if hello[:len(MAGIC)] != MAGIC:
        raise _HandshakeFailed("the listener does not speak the edge protocol")
    theirs, mine = hello[len(MAGIC):], os.urandom(NONCE_BYTES)
    sock.sendall(MAGIC + mine + _mac(secret, b"dst", key, theirs, mine))
    answer = _read_exact(sock, MAC_BYTES)
    if not hmac.compare_digest(answer, _mac(secret, b"src", key, mine, theirs)):
        raise _HandshakeFailed("the listener could not prove the job's secret")
    sock.settimeout(None)
    return _tcp(sock)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise _HandshakeFailed("the listener closed the connection during the handshake")
        buf += chunk
    return bytes(buf)


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
    except OSError:
        return socket.AF_INET


def _addr(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr)
