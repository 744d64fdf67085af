"""Place stage replicas on agents' free devices (pure: plain data in, plain data out).

A device hosts one worker at a time. Each replica asks for a device: "cpu" (any CPU slot),
"cuda" (any GPU), "cuda:N" (exactly that GPU of some agent) or "auto" (a GPU if any is left,
else a CPU slot). Replicas are matched most specific first ("cuda:N", then "cuda"/"cpu", then
"auto"): each class only ever narrows the one after it, so this greedy order finds a placement
whenever the device counts allow one. Policies only decide which agent a replica tries first.

The algorithm lives in planning/offers.py (`Offers.place`), over an index the controller keeps
between placements; `assign` builds that index from a list of offers for one call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from infscaled.config.schema import PLACEMENT_POLICIES
from infscaled.planning.offers import DEVICE_KINDS, Offers, PlacementError, device_kind
from infscaled.protocol.plan import Node

__all__ = ["DEVICE_KINDS", "PLACEMENT_POLICIES", "AgentOffer", "Offers", "PlacementError", "assign", "device_kind",
           "check_policy"]


@dataclass(frozen=True)
class AgentOffer:
    """An agent and the ids of the devices it offers ("cpu:0", "cuda:1"), in its own order."""

    agent_id: str
    devices: tuple[str, ...]


def check_policy(policy: str) -> None:
    if policy not in PLACEMENT_POLICIES:
        raise ValueError(f"unknown placement policy {policy!r}; allowed: {', '.join(PLACEMENT_POLICIES)}")


def assign(
    workers: Sequence[tuple[Node, str]],
    agents: Sequence[AgentOffer],
    policy: str,
    static: Mapping[Node, str] | None = None,
) -> dict[Node, tuple[str, str]]:
    """Map each stage replica (with the device it wants) to (agent_id, device_id).

    "pack" fills the agent offering the most devices first (ties: the given order), so the
    fewest agents are used and consecutive stages share a host; "spread" goes round-robin over
    the agents in the given order; "static" puts each replica on `static[node]`.
    Raises PlacementError when the replicas do not fit, ValueError on a bad argument.
    """
    check_policy(policy)
    if len({a.agent_id for a in agents}) != len(agents):
        raise ValueError(f"agent ids must be distinct, got {[a.agent_id for a in agents]}")
    offers = Offers()
    for position, a in enumerate(agents):
        offers.put(a.agent_id, position, a.devices)
    return offers.place(workers, policy, static)
