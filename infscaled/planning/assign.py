"""Place stage replicas on agents' free devices (pure: plain data in, plain data out).

A device hosts one worker at a time. Each replica asks for a device: "cpu" (any CPU slot),
"cuda" (any GPU), "cuda:N" (exactly that GPU of some agent) or "auto" (a GPU if any is left,
else a CPU slot). Replicas are matched most specific first ("cuda:N", then "cuda"/"cpu", then
"auto"): each class only ever narrows the one after it, so this greedy order finds a placement
whenever the device counts allow one. Policies only decide which agent a replica tries first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from infscaled.config.schema import PLACEMENT_POLICIES
from infscaled.errors import InfscaledError
from infscaled.protocol.plan import Node

__all__ = ["PLACEMENT_POLICIES", "AgentOffer", "PlacementError", "assign", "device_kind"]

DEVICE_KINDS = ("cpu", "cuda")


class PlacementError(InfscaledError):
    """The replicas do not fit on the devices offered; the message says what is needed and what is free."""


@dataclass(frozen=True)
class AgentOffer:
    """An agent and the ids of the devices it offers ("cpu:0", "cuda:1"), in its own order."""

    agent_id: str
    devices: tuple[str, ...]


def device_kind(device_id: str) -> str:
    """"cpu" or "cuda" for a device id like "cuda:1"."""
    return device_id.partition(":")[0]


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
    if policy not in PLACEMENT_POLICIES:
        raise ValueError(f"unknown placement policy {policy!r}; allowed: {', '.join(PLACEMENT_POLICIES)}")
    wants = [(node, _want(device)) for node, device in workers]
    free = {a.agent_id: list(a.devices) for a in agents}
    if len(free) != len(agents):
        raise ValueError(f"agent ids must be distinct, got {[a.agent_id for a in agents]}")
    if policy == "static":
        _check_static(wants, agents, static)
    order = [a.agent_id for a in agents]
    if policy == "pack":
        order.sort(key=lambda agent_id: -len(free[agent_id]))  # stable: ties keep the given order
    turn = 0  # spread: index of the agent whose turn it is

    result: dict[Node, tuple[str, str]] = {}
    for _, (node, want) in sorted(enumerate(wants), key=lambda item: (_specificity(item[1][1]), item[0])):
        if policy == "static":
            assert static is not None
            candidates = [static[node]]
        elif policy == "spread":
            candidates = order[turn:] + order[:turn]
        else:
            candidates = order
        found = _take(free, candidates, want)
        if found is None:
            raise PlacementError(_shortage(wants, agents, static if policy == "static" else None))
        result[node] = found
        if policy == "spread":
            turn = (order.index(found[0]) + 1) % len(order)
    return result


def _want(device: str) -> str:
    text = device.strip().lower()
    if text in ("auto", "cpu", "cuda"):
        return text
    kind, colon, index = text.partition(":")
    if kind == "cuda" and colon and index.isdigit():
        return f"cuda:{int(index)}"
    raise ValueError(f"bad device {device!r}; allowed: 'auto', 'cpu', 'cuda' or 'cuda:N'")


def _specificity(want: str) -> int:
    return {"auto": 2, "cpu": 1, "cuda": 1}.get(want, 0)


def _matches(want: str, device_id: str) -> bool:
    if want in DEVICE_KINDS:
        return device_kind(device_id) == want
    return device_id == want


def _take(free: dict[str, list[str]], candidates: Sequence[str], want: str) -> tuple[str, str] | None:
    """Remove and return the first matching free device, trying agents in `candidates` order."""
    # "auto" prefers any GPU in the cluster over a CPU slot on the first agent.
    for tier in (("cuda", "cpu") if want == "auto" else (want,)):
        for agent_id in candidates:
            for device_id in free.get(agent_id, []):
                if _matches(tier, device_id):
                    free[agent_id].remove(device_id)
                    return agent_id, device_id
    return None


def _check_static(wants: Sequence[tuple[Node, str]], agents: Sequence[AgentOffer],
                  static: Mapping[Node, str] | None) -> None:
    if static is None or any(node not in static for node, _ in wants):
        missing = [str(n) for n, _ in wants if static is None or n not in static]
        raise ValueError(f"policy 'static' needs an agent for every replica; missing: {', '.join(missing)}")
    known = {a.agent_id for a in agents}
    for node, _ in wants:
        if static[node] not in known:
            offered = ", ".join(sorted(known)) or "none"
            raise PlacementError(
                f"replica {node} is placed on agent {static[node]!r}, which offers no devices here; "
                f"agents offering devices: {offered}"
            )


def _shortage(wants: Sequence[tuple[Node, str]], agents: Sequence[AgentOffer],
              static: Mapping[Node, str] | None) -> str:
    """What is needed against what each agent offers, e.g.
    "needs 3 devices (2 cpu, 1 cuda); offered: a1: cpu:0, cpu:1; a2: none"."""
    needed = Counter("any device" if w == "auto" else w for _, w in wants)
    need = ", ".join(f"{count} {what}" for what, count in sorted(needed.items()))
    have = "; ".join(
        f"{a.agent_id}: {', '.join(a.devices) if a.devices else 'none'}" for a in agents
    ) or "no agents"
    text = f"needs {len(wants)} device(s) ({need}); offered: {have}"
    if any(w in ("auto", "cpu") for _, w in wants):
        # CPU slots are a count the agent is told, not hardware: say which flag raises it.
        text += (f"; a CPU agent offers the slots its --devices says (default: one per core): start it with "
                 f"--devices cpu:{len(wants)} or more")
    if static is not None:
        by_agent: dict[str, list[str]] = {}
        for node, want in wants:
            by_agent.setdefault(static[node], []).append(f"{node} ({want})")
        text += "; placement.agents puts " + "; ".join(
            f"{', '.join(nodes)} on {agent_id}" for agent_id, nodes in by_agent.items()
        )
    return text
