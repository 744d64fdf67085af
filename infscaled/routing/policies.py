"""Forwarding policies: pick one downstream candidate per micro-batch, as pure functions.

A sender (dispatcher or stage replica) keeps a `RouteView` of what it has observed about each
downstream edge and a `RouteState` (the policy's memory), and calls `choose` per micro-batch.
Randomness comes in through `draw`, so every decision is reproducible in tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from infscaled.errors import InfscaledError

POLICIES = ("round_robin", "random", "shortest_queue", "static", "weighted")


class NoRouteError(InfscaledError):
    """Every downstream candidate of a sender has failed."""


@dataclass(frozen=True)
class RouteView:
    """What the sender has observed, one entry per candidate (downstream edge)."""

    outstanding: tuple[int, ...]
    """Micro-batches sent to candidate i and not yet acknowledged (queued or computing there)."""
    throughput: tuple[float, ...]
    """Measured samples/s of candidate i (EWMA; 0.0 = not measured yet)."""
    alive: tuple[bool, ...]
    """False for candidates whose edge failed."""

    def __post_init__(self) -> None:
        if not len(self.outstanding) == len(self.throughput) == len(self.alive):
            raise ValueError(
                f"RouteView lengths differ: outstanding={len(self.outstanding)}, "
                f"throughput={len(self.throughput)}, alive={len(self.alive)}"
            )


@dataclass(frozen=True)
class RouteState:
    """The policy's own memory between decisions."""

    counter: int = 0
    """Round-robin position: the candidate to consider first next time."""
    credits: tuple[float, ...] = ()
    """Smooth weighted round robin current weights (reset when the candidate count changes)."""


def choose(
    policy: str, view: RouteView, state: RouteState, *, key: int, draw: float
) -> tuple[int, RouteState]:
    """Pick a candidate index for one micro-batch and return it with the policy's next state.

    `key` is the micro-batch's route key (a request id; used by "static"); `draw` is a uniform
    number in [0, 1) (used by "random"). Raises NoRouteError if no candidate is alive and
    ValueError on an unknown policy.
    """
    n = len(view.alive)
    alive = [i for i in range(n) if view.alive[i]]
    if not alive:
        raise NoRouteError(f"no live downstream candidate ({n} candidates, all failed)")
    if policy == "round_robin":
        pick = _first_alive(view, state.counter)
        return pick, RouteState((pick + 1) % n, state.credits)
    if policy == "random":
        if not 0.0 <= draw < 1.0:
            raise ValueError(f"draw must be in [0, 1), got {draw!r}")
        return alive[min(int(draw * len(alive)), len(alive) - 1)], state
    if policy == "shortest_queue":
        return _shortest_queue(view, state, n)
    if policy == "static":
        return _first_alive(view, key % n), state
    if policy == "weighted":
        return _weighted(view, state, alive, n)
    raise ValueError(f"unknown routing policy {policy!r}; allowed: {', '.join(POLICIES)}")


def update_throughput(old: float, samples: int, seconds: float, alpha: float = 0.2) -> float:
    """EWMA of samples/s; the first measurement (old <= 0) is taken as is.

    A zero or negative duration carries no information, so `old` is returned unchanged.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    if seconds <= 0.0:
        return old
    rate = samples / seconds
    if old <= 0.0:
        return rate
    return alpha * rate + (1.0 - alpha) * old


def _first_alive(view: RouteView, start: int) -> int:
    n = len(view.alive)
    for step in range(n):
        i = (start + step) % n
        if view.alive[i]:
            return i
    raise NoRouteError("no live downstream candidate")  # unreachable: choose checked first


def _shortest_queue(view: RouteView, state: RouteState, n: int) -> tuple[int, RouteState]:
    # Scan from the rotating start and keep only a strictly smaller queue, so the first of the
    # tied minima after the start wins and equal queues take turns.
    best = -1
    for step in range(n):
        i = (state.counter + step) % n
        if view.alive[i] and (best < 0 or view.outstanding[i] < view.outstanding[best]):
            best = i
    return best, RouteState((best + 1) % n, state.credits)


def _weighted(view: RouteView, state: RouteState, alive: list[int], n: int) -> tuple[int, RouteState]:
    # Smooth weighted round robin (nginx): every live candidate gains its weight, the richest
    # is picked and pays the total. Over a full cycle picks are exactly proportional to weights
    # and interleaved rather than bursty.
    measured = [view.throughput[i] for i in alive if view.throughput[i] > 0.0]
    default = sum(measured) / len(measured) if measured else 1.0
    weights = [view.throughput[i] if view.throughput[i] > 0.0 else default for i in range(n)]
    credits = list(state.credits) if len(state.credits) == n else [0.0] * n
    total = 0.0
    for i in range(n):
        if view.alive[i]:
            credits[i] += weights[i]
            total += weights[i]
        else:
            credits[i] = 0.0  # a failed edge keeps no saved-up claim
    best = max(alive, key=lambda i: (credits[i], -i))  # ties: lowest index
    credits[best] -= total
    return best, RouteState(state.counter, tuple(credits))
