"""Unit tests for the forwarding policies (pure functions, no processes)."""

from __future__ import annotations

from collections import Counter

import pytest

from infscaled.errors import InfscaledError
from infscaled.routing import POLICIES, NoRouteError, RouteState, RouteView, choose, update_throughput


def view(n: int = 3, *, outstanding=None, throughput=None, alive=None) -> RouteView:
    return RouteView(
        outstanding=tuple(outstanding or [0] * n),
        throughput=tuple(throughput or [0.0] * n),
        alive=tuple(alive if alive is not None else [True] * n),
    )


def run(policy: str, v: RouteView, picks: int, *, keys=None, draws=None) -> list[int]:
    state = RouteState()
    out = []
    for i in range(picks):
        key = keys[i] if keys else i
        draw = draws[i] if draws else 0.0
        pick, state = choose(policy, v, state, key=key, draw=draw)
        out.append(pick)
    return out


# ---------------------------------------------------------------- round robin


def test_round_robin_cycles():
    assert run("round_robin", view(3), 7) == [0, 1, 2, 0, 1, 2, 0]


def test_round_robin_skips_dead():
    assert run("round_robin", view(4, alive=[True, False, True, False]), 5) == [0, 2, 0, 2, 0]


def test_round_robin_continues_after_previous_pick():
    pick, state = choose("round_robin", view(3), RouteState(counter=2), key=0, draw=0.0)
    assert (pick, state.counter) == (2, 0)
    v = view(3, alive=[False, True, True])
    pick, _ = choose("round_robin", v, RouteState(counter=0), key=0, draw=0.0)
    assert pick == 1


# ---------------------------------------------------------------- random


def test_random_uses_draw_over_alive():
    v = view(4, alive=[True, False, True, True])
    assert run("random", v, 5, draws=[0.0, 0.33, 0.34, 0.66, 0.999]) == [0, 0, 2, 2, 3]


def test_random_is_uniform_over_a_grid():
    v = view(3, alive=[True, True, False])
    picks = run("random", v, 1000, draws=[i / 1000 for i in range(1000)])
    assert Counter(picks) == {0: 500, 1: 500}


@pytest.mark.parametrize("draw", [-0.1, 1.0, 2.0])
def test_random_rejects_bad_draw(draw):
    with pytest.raises(ValueError, match="draw"):
        choose("random", view(2), RouteState(), key=0, draw=draw)


# ---------------------------------------------------------------- shortest queue


def test_shortest_queue_true_minimum_wins():
    # The reference bug kept comparing against the first candidate; the global minimum must win
    # wherever it sits, whatever the rotation.
    v = view(5, outstanding=[4, 3, 5, 1, 2])
    for counter in range(5):
        pick, _ = choose("shortest_queue", v, RouteState(counter=counter), key=0, draw=0.0)
        assert pick == 3


def test_shortest_queue_decreasing_then_increasing():
    assert choose("shortest_queue", view(4, outstanding=[9, 7, 3, 8]), RouteState(), key=0, draw=0.0)[0] == 2


def test_shortest_queue_ties_spread_evenly():
    picks = run("shortest_queue", view(3, outstanding=[2, 2, 2]), 9)
    assert picks == [0, 1, 2] * 3


def test_shortest_queue_ties_only_among_minima():
    picks = run("shortest_queue", view(4, outstanding=[1, 5, 1, 5]), 6)
    assert picks == [0, 2, 0, 2, 0, 2]


def test_shortest_queue_ignores_dead():
    v = view(3, outstanding=[0, 4, 2], alive=[False, True, True])
    assert choose("shortest_queue", v, RouteState(), key=0, draw=0.0)[0] == 2


def test_shortest_queue_tracks_a_simulated_queue():
    # Feeding picks back into the queue lengths keeps the candidates level.
    queues = [0, 0, 0]
    state = RouteState()
    for _ in range(30):
        pick, state = choose("shortest_queue", view(3, outstanding=queues), state, key=0, draw=0.0)
        queues[pick] += 1
        assert max(queues) - min(queues) <= 1
    assert queues == [10, 10, 10]


# ---------------------------------------------------------------- static


def test_static_sticks_to_key():
    assert run("static", view(3), 6, keys=[0, 1, 2, 3, 4, 5]) == [0, 1, 2, 0, 1, 2]
    assert run("static", view(3), 3, keys=[7, 7, 7]) == [1, 1, 1]


def test_static_falls_over_to_next_alive():
    v = view(4, alive=[True, False, False, True])
    assert run("static", v, 4, keys=[1, 2, 3, 4]) == [3, 3, 3, 0]


# ---------------------------------------------------------------- weighted


def test_weighted_exact_proportions():
    picks = run("weighted", view(2, throughput=[1.0, 3.0]), 400)
    assert Counter(picks) == {0: 100, 1: 300}
    # smooth: the light candidate is never starved for more than one cycle
    assert all(0 in picks[i : i + 4] for i in range(0, 400, 4))


def test_weighted_three_way():
    picks = run("weighted", view(3, throughput=[5.0, 1.0, 1.0]), 700)
    assert Counter(picks) == {0: 500, 1: 100, 2: 100}
    assert picks[:7] == [0, 0, 1, 0, 2, 0, 0]  # nginx's documented sequence for 5:1:1


def test_weighted_unmeasured_gets_mean_of_measured():
    # the unmeasured candidate weighs (2 + 4) / 2 = 3
    assert Counter(run("weighted", view(3, throughput=[2.0, 4.0, 0.0]), 900)) == {0: 200, 1: 400, 2: 300}


def test_weighted_nothing_measured_is_round_robin():
    assert Counter(run("weighted", view(4), 400)) == {0: 100, 1: 100, 2: 100, 3: 100}


def test_weighted_skips_dead():
    v = view(3, throughput=[1.0, 100.0, 1.0], alive=[True, False, True])
    assert Counter(run("weighted", v, 10)) == {0: 5, 2: 5}


def test_weighted_resets_credits_on_candidate_change():
    _, state = choose("weighted", view(2, throughput=[1.0, 1.0]), RouteState(), key=0, draw=0.0)
    pick, state = choose("weighted", view(3), state, key=0, draw=0.0)
    assert pick == 0 and len(state.credits) == 3


# ---------------------------------------------------------------- common


@pytest.mark.parametrize("policy", POLICIES)
def test_no_route_when_all_dead(policy):
    with pytest.raises(NoRouteError) as info:
        choose(policy, view(3, alive=[False, False, False]), RouteState(), key=0, draw=0.0)
    assert isinstance(info.value, InfscaledError)


@pytest.mark.parametrize("policy", POLICIES)
def test_no_candidates(policy):
    with pytest.raises(NoRouteError):
        choose(policy, view(0), RouteState(), key=0, draw=0.0)


@pytest.mark.parametrize("policy", POLICIES)
def test_single_live_candidate_always_chosen(policy):
    v = view(4, outstanding=[0, 9, 0, 0], throughput=[5.0, 1.0, 5.0, 5.0], alive=[False, True, False, False])
    assert set(run(policy, v, 8, keys=list(range(8)), draws=[i / 8 for i in range(8)])) == {1}


@pytest.mark.parametrize("policy", POLICIES)
def test_choose_is_pure(policy):
    v = view(3, outstanding=[1, 0, 2], throughput=[1.0, 2.0, 3.0])
    state = RouteState(counter=1, credits=(0.5, -1.0, 0.5))
    assert choose(policy, v, state, key=5, draw=0.4) == choose(policy, v, state, key=5, draw=0.4)


def test_unknown_policy():
    with pytest.raises(ValueError, match="allowed: round_robin"):
        choose("fastest", view(2), RouteState(), key=0, draw=0.0)


def test_route_view_lengths_must_match():
    with pytest.raises(ValueError, match="lengths differ"):
        RouteView(outstanding=(0, 0), throughput=(0.0,), alive=(True, True))


# ---------------------------------------------------------------- throughput


def test_update_throughput():
    assert update_throughput(0.0, 100, 2.0) == 50.0  # first measurement taken as is
    assert update_throughput(50.0, 100, 1.0) == pytest.approx(0.2 * 100 + 0.8 * 50)
    assert update_throughput(50.0, 100, 1.0, alpha=1.0) == 100.0
    assert update_throughput(50.0, 100, 0.0) == 50.0  # no time elapsed: no information
    with pytest.raises(ValueError, match="alpha"):
        update_throughput(1.0, 1, 1.0, alpha=0.0)


def test_update_throughput_converges():
    rate = 0.0
    for _ in range(100):
        rate = update_throughput(rate, 30, 0.1)
    assert rate == pytest.approx(300.0)
