"""Placement of stage replicas onto agents' free devices (pure function, no processes)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from infscaled.planning.assign import AgentOffer, Offers, PlacementError, assign, device_kind
from infscaled.protocol.plan import Node

N00, N10, N11, N20 = Node(0, 0), Node(1, 0), Node(1, 1), Node(2, 0)


def cpus(agent_id: str, n: int) -> AgentOffer:
    return AgentOffer(agent_id, tuple(f"cpu:{i}" for i in range(n)))


def test_pack_fills_the_largest_agent_first() -> None:
    workers = [(N00, "cpu"), (N10, "cpu"), (N11, "cpu")]
    got = assign(workers, [cpus("a1", 2), cpus("a2", 3)], "pack")
    assert got == {N00: ("a2", "cpu:0"), N10: ("a2", "cpu:1"), N11: ("a2", "cpu:2")}


def test_pack_overflows_to_the_next_agent() -> None:
    workers = [(N00, "cpu"), (N10, "cpu"), (N11, "cpu")]
    got = assign(workers, [cpus("a1", 2), cpus("a2", 2)], "pack")
    assert [got[n][0] for n in (N00, N10, N11)] == ["a1", "a1", "a2"]


def test_spread_goes_round_robin() -> None:
    workers = [(N00, "cpu"), (N10, "cpu"), (N11, "cpu"), (N20, "cpu")]
    got = assign(workers, [cpus("a1", 4), cpus("a2", 4), cpus("a3", 4)], "spread")
    assert [got[n][0] for n in (N00, N10, N11, N20)] == ["a1", "a2", "a3", "a1"]
    assert got[N20] == ("a1", "cpu:1")


def test_spread_skips_agents_without_a_matching_device() -> None:
    workers = [(N00, "cuda"), (N10, "cuda")]
    agents = [cpus("a1", 4), AgentOffer("g", ("cuda:0", "cuda:1"))]
    assert assign(workers, agents, "spread") == {N00: ("g", "cuda:0"), N10: ("g", "cuda:1")}


def test_static_follows_the_job() -> None:
    workers = [(N00, "cpu"), (N10, "cuda:1"), (N11, "cuda")]
    agents = [cpus("a1", 1), AgentOffer("g", ("cpu:0", "cuda:0", "cuda:1"))]
    got = assign(workers, agents, "static", {N00: "a1", N10: "g", N11: "g"})
    assert got == {N00: ("a1", "cpu:0"), N10: ("g", "cuda:1"), N11: ("g", "cuda:0")}


def test_static_names_an_unknown_agent() -> None:
    with pytest.raises(PlacementError, match=r"replica 0.0 is placed on agent 'a9'.*offering devices: a1"):
        assign([(N00, "cpu")], [cpus("a1", 1)], "static", {N00: "a9"})


def test_static_shortage_names_the_mapping() -> None:
    with pytest.raises(PlacementError) as info:
        assign([(N00, "cpu"), (N10, "cpu")], [cpus("a1", 1), cpus("a2", 1)], "static", {N00: "a1", N10: "a1"})
    assert "placement.agents puts 0.0 (cpu), 1.0 (cpu) on a1" in str(info.value)


def test_specific_gpus_are_matched_before_kinds() -> None:
    # In stage order "cuda" would take cuda:0 and "cuda:0" would then fail; most specific first avoids it.
    workers = [(N00, "cuda"), (N10, "cuda:0")]
    got = assign(workers, [AgentOffer("g", ("cuda:0", "cuda:1"))], "pack")
    assert got == {N00: ("g", "cuda:1"), N10: ("g", "cuda:0")}


def test_auto_prefers_gpus_anywhere_then_cpus() -> None:
    workers = [(N00, "auto"), (N10, "auto")]
    agents = [cpus("a1", 4), AgentOffer("g", ("cuda:0",))]
    got = assign(workers, agents, "pack")
    assert got[N00] == ("g", "cuda:0")
    assert got[N10] == ("a1", "cpu:0")


def test_shortage_message_says_needed_and_offered() -> None:
    with pytest.raises(PlacementError) as info:
        assign([(N00, "cpu"), (N10, "cpu"), (N11, "cuda")], [cpus("a1", 2), AgentOffer("a2", ())], "pack")
    assert str(info.value) == ("needs 3 device(s) (2 cpu, 1 cuda); offered: a1: cpu:0, cpu:1; a2: none; a CPU "
                                "agent offers the slots its --devices says (default: one per core): start it with "
                                "--devices cpu:3 or more")


def test_no_agents() -> None:
    with pytest.raises(PlacementError, match="offered: no agents"):
        assign([(N00, "auto")], [], "spread")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown placement policy 'fill'"):
        assign([(N00, "cpu")], [cpus("a", 1)], "fill")
    with pytest.raises(ValueError, match="bad device 'gpu'"):
        assign([(N00, "gpu")], [cpus("a", 1)], "pack")
    with pytest.raises(ValueError, match="missing: 0.0"):
        assign([(N00, "cpu")], [cpus("a", 1)], "static", {})


_WANTS = st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:1", "auto"])
_AGENT = st.tuples(st.integers(0, 3), st.sets(st.integers(0, 2), max_size=3))


@given(st.lists(_WANTS, min_size=1, max_size=8), st.lists(_AGENT, min_size=1, max_size=4),
       st.sampled_from(["pack", "spread"]))
def test_placement_is_valid_or_provably_impossible(wants: list[str], specs: list[tuple[int, set[int]]],
                                                   policy: str) -> None:
    agents = [
        AgentOffer(f"a{i}", tuple(f"cpu:{c}" for c in range(n_cpu)) + tuple(f"cuda:{g}" for g in sorted(gpus)))
        for i, (n_cpu, gpus) in enumerate(specs)
    ]
    workers = [(Node(i, 0), w) for i, w in enumerate(wants)]
    try:
        got = assign(workers, agents, policy)
    except PlacementError:
        # Impossible means a counting argument fails: too few exact GPUs, GPUs, or devices.
        pool = [d for a in agents for d in a.devices]
        gpus = [d for d in pool if device_kind(d) == "cuda"]
        exact = {w: wants.count(w) for w in ("cuda:0", "cuda:1")}
        short_exact = any(count > pool.count(w) for w, count in exact.items())
        short_gpu = wants.count("cuda") + sum(exact.values()) > len(gpus)
        short_cpu = wants.count("cpu") > len(pool) - len(gpus)
        assert short_exact or short_gpu or short_cpu or len(wants) > len(pool)
        return
    used = list(got.values())
    assert len(set(used)) == len(used), "a device got two workers"
    offered = {(a.agent_id, d) for a in agents for d in a.devices}
    for node, want in workers:
        agent_id, device = got[node]
        assert (agent_id, device) in offered
        if want in ("cpu", "cuda"):
            assert device_kind(device) == want
        elif want != "auto":
            assert device == want


def _scan(workers: list[tuple[Node, str]], agents: list[AgentOffer], policy: str) -> dict[Node, tuple[str, str]]:
    """The placement rule written as the plain scan over the whole list (the code before the
    index): the oracle an index kept across changes must agree with."""
    free = {a.agent_id: list(a.devices) for a in agents}
    order = [a.agent_id for a in agents]
    if policy == "pack":
        order.sort(key=lambda a: -len(free[a]))
    turn, out = 0, {}
    spec = {"auto": 2, "cpu": 1, "cuda": 1}
    for _, (node, want) in sorted(enumerate(workers), key=lambda item: (spec.get(item[1][1], 0), item[0])):
        found = None
        for tier in (("cuda", "cpu") if want == "auto" else (want,)):
            for agent_id in (order[turn:] + order[:turn]) if policy == "spread" else order:
                match = [d for d in free[agent_id] if (d == tier if ":" in tier else device_kind(d) == tier)]
                if match:
                    found = (agent_id, match[0])
                    free[agent_id].remove(match[0])
                    break
            if found:
                break
        if found is None:
            raise PlacementError("short")
        out[node] = found
        turn = (order.index(found[0]) + 1) % len(order)
    return out


@given(st.lists(st.tuples(st.integers(0, 11), st.integers(0, 2), st.sets(st.integers(0, 3), max_size=4),
                          st.sets(st.integers(0, 5), max_size=3)), min_size=1, max_size=12),
       st.lists(_WANTS, min_size=1, max_size=6), st.sampled_from(["pack", "spread"]))
def test_the_kept_index_places_as_a_scan_of_the_whole_fleet(
        steps: list[tuple[int, int, set[int], set[int]]], wants: list[str], policy: str) -> None:
    """Agents join, leave and rejoin (keeping their position), devices get busy and free; after
    each change the index's placement equals the scan over every agent's free devices, and the
    shortage message equals the one for the same offers built from scratch."""
    offers = Offers()
    devices: dict[str, tuple[str, ...]] = {}
    busy: set[tuple[str, str]] = set()
    workers = [(Node(i, 0), w) for i, w in enumerate(wants)]
    for slot, action, gpus, busy_slots in steps:
        agent_id = f"a{slot}"
        if action == 0:
            offers.remove(agent_id)
            devices.pop(agent_id, None)
        else:
            devices[agent_id] = tuple(f"cuda:{g}" for g in sorted(gpus)) + ("cpu:0",) * (action == 2)
            offers.put(agent_id, slot, devices[agent_id])
        busy = {(f"a{(slot + k) % 12}", f"cuda:{k % 4}") for k in busy_slots}
        offers.set_busy(busy)
        listed = [AgentOffer(a, tuple(d for d in devices[a] if (a, d) not in busy))
                  for a in sorted(devices, key=lambda a: int(a[1:]))]
        try:
            expected: dict[Node, tuple[str, str]] | str = _scan(workers, listed, policy)
        except PlacementError:
            with pytest.raises(PlacementError) as scratch:
                assign(workers, listed, policy)
            expected = str(scratch.value)
        try:
            got: dict[Node, tuple[str, str]] | str = offers.place(workers, policy)
        except PlacementError as exc:
            got = str(exc)
        assert got == expected


def test_a_large_fleet_shortage_is_summarised() -> None:
    agents = [AgentOffer(f"h{i:03d}", ("cuda:0",) if i % 50 == 7 else ()) for i in range(200)]
    with pytest.raises(PlacementError) as info:
        assign([(Node(i, 0), "cuda") for i in range(5)], agents, "pack")
    assert str(info.value) == ("needs 5 device(s) (5 cuda); offered: 200 agents, 4 cuda; the first with free "
                               "devices: h007: cuda:0; h057: cuda:0; h107: cuda:0; h157: cuda:0")
    with pytest.raises(PlacementError, match=r"'h999'.*offering devices: 200 agents, among them h000, h001,"):
        assign([(N00, "cuda")], agents, "static", {N00: "h999"})
