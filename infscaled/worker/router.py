"""A sender's view of its downstream edges, feeding the pure routing policies.

Shared by the dispatcher and every stage replica. Candidates are edge keys and change while
serving (protocol/topology.py): `add` once an edge is open, `remove` when it is being drained
or has failed. The compute thread calls `pick`; each out-edge's ack reader calls `acked`;
hence the lock.
"""

from __future__ import annotations

import random
import threading

from infscaled.routing import RouteState, RouteView, choose, update_throughput
from infscaled.routing.policies import NoRouteError


class Router:
    def __init__(self, policy: str, seed: int = 0) -> None:
        self.policy = policy
        self._lock = threading.Lock()
        self._keys: list[str] = []
        self._outstanding: dict[str, int] = {}
        self._throughput: dict[str, float] = {}
        self._state = RouteState()
        self._rng = random.Random(seed)

    def add(self, key: str) -> None:
        with self._lock:
            if key not in self._outstanding:
                self._keys.append(key)
                self._keys.sort()
                self._outstanding[key] = 0
                self._throughput[key] = 0.0
                self._state = RouteState(self._state.counter)  # weighted credits restart for the new set

    def remove(self, key: str) -> None:
        with self._lock:
            if key in self._outstanding:
                self._keys.remove(key)
                del self._outstanding[key], self._throughput[key]
                self._state = RouteState(self._state.counter)

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)

    def pick(self, route_key: int) -> str:
        """The candidate for the next micro-batch; NoRouteError when there is none."""
        with self._lock:
            keys = self._keys
            if not keys:
                raise NoRouteError("no open downstream edge to route to")
            view = RouteView(tuple(self._outstanding[k] for k in keys), tuple(self._throughput[k] for k in keys),
                             (True,) * len(keys))
            index, self._state = choose(self.policy, view, self._state, key=route_key, draw=self._rng.random())
            key = keys[index]
            self._outstanding[key] += 1
            return key

    def acked(self, key: str, samples: int, compute_s: float) -> None:
        """Candidate `key` finished computing one micro-batch of `samples`."""
        with self._lock:
            if key in self._outstanding:
                self._outstanding[key] = max(0, self._outstanding[key] - 1)
                self._throughput[key] = update_throughput(self._throughput[key], samples, compute_s)

    def outstanding(self) -> dict[str, int]:
        with self._lock:
            return dict(self._outstanding)
