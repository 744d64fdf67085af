"""The devices agents offer, indexed by what a replica can ask for, and the placement over them.

`assign` (planning/assign.py) used to copy every agent's free devices, sort the fleet by free
count and scan it for each replica: at 10,000 agents a job submission spent most of its time
there. `Offers` keeps, between placements, each agent's free devices and, for every device
class a replica may want ("cpu", "cuda", "cuda:N"), the agents holding one free, sorted both by
position (spread) and by free count then position (pack). A placement then walks only the
agents it may take from: each replica's choice skips at most the devices already taken in the
same placement. Positions are the caller's registration order ("the given order").

Busy devices (held by jobs) come as one set per placement (`set_busy`); only the difference
from the previous set is applied, so an unchanged fleet costs nothing to keep current.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence

from infscaled.errors import InfscaledError
from infscaled.protocol.plan import Node

DEVICE_KINDS = ("cpu", "cuda")
# A shortage message lists every agent up to this many; beyond, a summary and the first few.
LISTED_AGENTS = 20


class PlacementError(InfscaledError):
    """The replicas do not fit on the devices offered; the message says what is needed and what is free."""


def device_kind(device_id: str) -> str:
    """"cpu" or "cuda" for a device id like "cuda:1"."""
    return device_id.partition(":")[0]


def want_of(device: str) -> str:
    """A replica's device request, normalised: "auto", "cpu", "cuda" or "cuda:N"; ValueError otherwise."""
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


def _drop(positions: list[int], pos: int) -> None:
    i = bisect.bisect_left(positions, pos)
    if i < len(positions) and positions[i] == pos:
        del positions[i]


class Offers:
    """Agents (each at a position) and their devices, minus the busy ones, indexed for placement."""

    def __init__(self) -> None:
        self._devices: dict[str, tuple[str, ...]] = {}  # every device the agent offers, busy or not
        self._free: dict[str, tuple[str, ...]] = {}  # the free ones, in the agent's own order
        self._pos: dict[str, int] = {}
        self._ids: dict[int, str] = {}
        self._order: list[int] = []  # positions of every agent here, sorted
        self._by_class: dict[str, list[int]] = {}  # class -> sorted positions of agents with a free one
        self._packed: dict[str, dict[int, list[int]]] = {}  # class -> free count -> sorted positions
        self._busy: set[tuple[str, str]] = set()
        self._busy_on: dict[str, set[str]] = {}  # the same, by agent
        self.free_by_kind: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._pos

    def put(self, agent_id: str, position: int, devices: Sequence[str]) -> None:
        """Add an agent (or replace its devices) at `position`; devices busy now stay out."""
        if agent_id in self._pos:
            self.remove(agent_id)
        self._devices[agent_id] = tuple(devices)
        self._pos[agent_id] = position
        self._ids[position] = agent_id
        bisect.insort(self._order, position)
        self._index(agent_id)

    def remove(self, agent_id: str) -> None:
        if agent_id not in self._pos:
            return
        self._unindex(agent_id)
        pos = self._pos.pop(agent_id)
        del self._ids[pos], self._devices[agent_id]
        _drop(self._order, pos)

    def set_busy(self, busy: set[tuple[str, str]]) -> None:
        """(agent, device) pairs held by jobs now; agents not here may be named (they may come back).
        Costs a comparison with the previous set, plus re-indexing the agents whose devices changed."""
        if busy == self._busy:
            return
        changed = busy ^ self._busy
        self._busy = set(busy)
        touched: set[str] = set()
        for agent_id, device_id in changed:
            held = self._busy_on.setdefault(agent_id, set())
            if (agent_id, device_id) in busy:
                held.add(device_id)
            else:
                held.discard(device_id)
                if not held:
                    del self._busy_on[agent_id]
            if agent_id in self._pos:
                touched.add(agent_id)
        for agent_id in touched:
            self._unindex(agent_id)
            self._index(agent_id)

    def free(self, agent_id: str) -> tuple[str, ...]:
        return self._free.get(agent_id, ())

    def first_after(self, agent_id: str | None) -> str | None:
        """The agent following `agent_id` in order (the first after the last; round robin), or None."""
        if not self._order:
            return None
        after = self._pos.get(agent_id, -1) if agent_id is not None else -1
        i = bisect.bisect_right(self._order, after)
        return self._ids[self._order[i % len(self._order)]]

    def _index(self, agent_id: str) -> None:
        held = self._busy_on.get(agent_id)
        devices = self._devices[agent_id]
        free = devices if held is None else tuple(d for d in devices if d not in held)
        self._free[agent_id] = free
        pos, n = self._pos[agent_id], len(free)
        kinds = [device_kind(d) for d in free]
        for c in {*free, *kinds}:
            bisect.insort(self._by_class.setdefault(c, []), pos)
            bisect.insort(self._packed.setdefault(c, {}).setdefault(n, []), pos)
        for k in kinds:
            self.free_by_kind[k] += 1

    def _unindex(self, agent_id: str) -> None:
        free = self._free.pop(agent_id, ())
        pos, n = self._pos[agent_id], len(free)
        kinds = [device_kind(d) for d in free]
        for c in {*free, *kinds}:
            _drop(self._by_class[c], pos)
            counts = self._packed[c]
            _drop(counts[n], pos)
            if not counts[n]:
                del counts[n]
        for k in kinds:
            self.free_by_kind[k] -= 1

    # -- placement -------------------------------------------------------------------------------

    def place(self, workers: Sequence[tuple[Node, str]], policy: str,
              static: Mapping[Node, str] | None = None) -> dict[Node, tuple[str, str]]:
        """Map each stage replica (with the device it wants) to (agent_id, device_id).

        A device hosts one worker. Replicas are matched most specific first ("cuda:N", then
        "cuda"/"cpu", then "auto", which prefers any GPU over a CPU slot): each class only
        narrows the one after it, so this greedy order finds a placement whenever the device
        counts allow one. "pack" tries agents by most free devices first (ties: position), so
        the fewest agents are used; "spread" goes round robin by position from after the agent
        that took the previous replica; "static" puts each replica on `static[node]`.
        Raises PlacementError when the replicas do not fit, ValueError on a bad argument.
        """
        wants = [(node, want_of(device)) for node, device in workers]
        if policy == "static":
            self._check_static(wants, static)
        taken: set[tuple[str, str]] = set()
        turn = 0  # spread: the position from which the next replica's search starts
        result: dict[Node, tuple[str, str]] = {}
        for _, (node, want) in sorted(enumerate(wants), key=lambda item: (_specificity(item[1][1]), item[0])):
            found = None
            for tier in (("cuda", "cpu") if want == "auto" else (want,)):
                if policy == "static":
                    assert static is not None
                    candidates: Iterable[str] = (static[node],)
                elif policy == "spread":
                    candidates = self._spread(tier, turn)
                else:
                    candidates = self._pack(tier)
                found = self._take(candidates, tier, taken)
                if found is not None:
                    break
            if found is None:
                raise PlacementError(self._shortage(wants, static if policy == "static" else None))
            taken.add(found)
            result[node] = found
            turn = self._pos[found[0]] + 1
        return result

    def _take(self, candidates: Iterable[str], want: str, taken: set[tuple[str, str]]) -> tuple[str, str] | None:
        for agent_id in candidates:
            for device_id in self._free.get(agent_id, ()):
                if (agent_id, device_id) not in taken and _matches(want, device_id):
                    return agent_id, device_id
        return None

    def _pack(self, want: str) -> Iterator[str]:
        counts = self._packed.get(want, {})
        for n in sorted(counts, reverse=True):
            for pos in counts[n]:
                yield self._ids[pos]

    def _spread(self, want: str, turn: int) -> Iterator[str]:
        positions = self._by_class.get(want, [])
        start = bisect.bisect_left(positions, turn)
        for i in range(start, len(positions)):
            yield self._ids[positions[i]]
        for i in range(start):
            yield self._ids[positions[i]]

    # -- errors ----------------------------------------------------------------------------------

    def _listed(self, count: int, free_only: bool) -> list[str]:
        """Up to `count` agent ids in order (those with free devices only, if asked): a message's sample."""
        out: list[str] = []
        for pos in self._order:
            agent_id = self._ids[pos]
            if not free_only or self._free[agent_id]:
                out.append(agent_id)
                if len(out) == count:
                    break
        return out

    def _check_static(self, wants: Sequence[tuple[Node, str]], static: Mapping[Node, str] | None) -> None:
        if static is None or any(node not in static for node, _ in wants):
            missing = [str(n) for n, _ in wants if static is None or n not in static]
            raise ValueError(f"policy 'static' needs an agent for every replica; missing: {', '.join(missing)}")
        for node, _ in wants:
            if static[node] not in self._pos:
                if len(self) <= LISTED_AGENTS:
                    offered = ", ".join(sorted(self._pos)) or "none"
                else:
                    offered = f"{len(self)} agents, among them {', '.join(self._listed(LISTED_AGENTS // 2, False))}"
                raise PlacementError(
                    f"replica {node} is placed on agent {static[node]!r}, which offers no devices here; "
                    f"agents offering devices: {offered}"
                )

    def _shortage(self, wants: Sequence[tuple[Node, str]], static: Mapping[Node, str] | None) -> str:
        """What is needed against what is offered, e.g.
        "needs 3 devices (2 cpu, 1 cuda); offered: a1: cpu:0, cpu:1; a2: none"; past LISTED_AGENTS
        agents, the free devices by kind and the first agents that have some."""
        needed = Counter("any device" if w == "auto" else w for _, w in wants)
        need = ", ".join(f"{count} {what}" for what, count in sorted(needed.items()))
        if len(self) <= LISTED_AGENTS:
            have = "; ".join(f"{a}: {', '.join(self._free[a]) or 'none'}" for a in self._listed(len(self), False))
        else:
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.free_by_kind.items()) if n) or "no devices free"
            sample = "; ".join(f"{a}: {', '.join(self._free[a])}" for a in self._listed(LISTED_AGENTS // 2, True))
            have = f"{len(self)} agents, {kinds}" + (f"; the first with free devices: {sample}" if sample else "")
        text = f"needs {len(wants)} device(s) ({need}); offered: {have or 'no agents'}"
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
