"""A sender's view of its downstream edges, feeding the pure routing policies.

Shared by the dispatcher and every stage replica. The data thread calls `pick` and
`sent`; each out-edge's ack thread calls `acked`; hence the lock.
"""

from __future__ import annotations

import random
import threading

from infscaled.routing import RouteState, RouteView, choose, update_throughput


class Router:
    def __init__(self, policy: str, n_candidates: int, seed: int = 0) -> None:
        self.policy = policy
        self._lock = threading.Lock()
        self._outstanding = [0] * n_candidates
        self._throughput = [0.0] * n_candidates
        self._alive = [True] * n_candidates
        self._state = RouteState()
        self._rng = random.Random(seed)

    def pick(self, key: int) -> int:
        """Index of the candidate for the next micro-batch (raises NoRouteError if none is alive)."""
        with self._lock:
            view = RouteView(tuple(self._outstanding), tuple(self._throughput), tuple(self._alive))
            index, self._state = choose(self.policy, view, self._state, key=key, draw=self._rng.random())
            self._outstanding[index] += 1
            return index

    def acked(self, index: int, samples: int, compute_s: float) -> None:
        """Candidate `index` finished computing one micro-batch of `samples`."""
        with self._lock:
            self._outstanding[index] = max(0, self._outstanding[index] - 1)
            self._throughput[index] = update_throughput(self._throughput[index], samples, compute_s)

    def mark_dead(self, index: int) -> None:
        with self._lock:
            self._alive[index] = False

    def outstanding(self) -> list[int]:
        with self._lock:
            return list(self._outstanding)
