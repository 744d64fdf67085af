"""Unit tests for partitioning, graph building, placement, ports and make_plan (no processes)."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infscaled.config import parse_job
from infscaled.planning.graph import build_edges, check_paths, downstream, upstream
from infscaled.planning.job import make_plan, ports_needed
from infscaled.planning.partition import balance, check_cover, stage_weights
from infscaled.planning.placement import place
from infscaled.planning.ports import PICK_RANGE, PORTS_ENV, ephemeral_low, free_ports, run_port_range
from infscaled.protocol.plan import DISPATCHER, JobPlan, Node


def brute_force_best(weights: list[float], stages: int) -> float:
    """Smallest achievable heaviest stage, by trying every set of boundaries."""
    n = len(weights)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = (0, *cuts, n)
        heaviest = max(sum(weights[a:b]) for a, b in itertools.pairwise(bounds))
        best = min(best, heaviest)
    return best


# ---------------------------------------------------------------- partition


@pytest.mark.parametrize(
    ("weights", "stages", "expected"),
    [
        ([1, 1, 1, 1], 2, ((0, 1), (2, 3))),
        ([1, 2, 3, 4, 5], 2, ((0, 2), (3, 4))),  # max 9 is optimal: 6|9
        ([10, 1, 1, 1, 1], 2, ((0, 0), (1, 4))),
        ([1, 1, 1, 10], 2, ((0, 2), (3, 3))),
        ([5], 1, ((0, 0),)),
        ([3, 3, 3], 3, ((0, 0), (1, 1), (2, 2))),
        ([7, 2, 5, 10, 8], 2, ((0, 2), (3, 4))),  # classic: 14|18
        ([7, 2, 5, 10, 8], 3, ((0, 2), (3, 3), (4, 4))),  # 14|10|8 beats 9|15|8
    ],
)
def test_balance_hand_made(weights, stages, expected):
    ranges = balance(weights, stages)
    assert max(stage_weights(weights, ranges)) == brute_force_best(weights, stages)
    assert ranges == expected


def test_balance_prefers_earliest_boundaries():
    # Zero-weight units make several splits optimal; the earliest boundaries win.
    assert balance([1, 0, 0, 1], 2) == ((0, 0), (1, 3))  # 1|1 three ways
    assert balance([0, 0, 0], 2) == ((0, 0), (1, 2))
    assert balance([0, 1, 0, 1, 0], 2) == ((0, 1), (2, 4))
    assert balance([0, 0, 1, 1], 2) == ((0, 2), (3, 3))  # the only split with max 1


def test_balance_single_stage_takes_everything():
    assert balance([4, 0, 9], 1) == ((0, 2),)


def test_balance_floats_are_exact():
    # 0.1 + 0.2 > 0.3 in floating point; exact sums must still see 0.1+0.2 vs 0.3 correctly.
    weights = [0.1, 0.2, 0.3]
    ranges = balance(weights, 2)
    assert max(stage_weights(weights, ranges)) == pytest.approx(0.3)


@pytest.mark.parametrize("stages", [0, -1, 4])
def test_balance_bad_stage_count(stages):
    with pytest.raises(ValueError, match="stages"):
        balance([1, 2, 3], stages)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf")])
def test_balance_bad_weights(bad):
    with pytest.raises(ValueError, match="unit 1"):
        balance([1, bad, 1], 2)


def test_balance_random_against_brute_force():
    rng = random.Random(1234)
    for _ in range(300):
        n = rng.randint(1, 8)
        weights = [rng.randint(0, 20) for _ in range(n)]
        stages = rng.randint(1, n)
        ranges = balance(weights, stages)
        check_cover(ranges, n)
        assert len(ranges) == stages
        best = brute_force_best(weights, stages)
        assert max(stage_weights(weights, ranges)) == best
        # documented tie-break: among optimal splits, the earliest boundaries
        optimal_ends = [
            ends
            for cuts in itertools.combinations(range(1, n), stages - 1)
            if max(sum(weights[a:b]) for a, b in itertools.pairwise((0, *cuts, n))) == best
            for ends in [tuple(c - 1 for c in (*cuts, n))]
        ]
        assert tuple(last for _, last in ranges) == min(optimal_ends)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_balance_property(data):
    weights = data.draw(
        st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=9)
    )
    stages = data.draw(st.integers(min_value=1, max_value=len(weights)))
    ranges = balance(weights, stages)
    assert len(ranges) == stages
    check_cover(ranges, len(weights))  # never drops or duplicates a unit
    assert all(first <= last for first, last in ranges)
    best = brute_force_best(weights, stages)
    assert max(stage_weights(weights, ranges)) == pytest.approx(best, rel=1e-12, abs=1e-9)


def test_balance_is_deterministic():
    weights = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    assert balance(weights, 4) == balance(list(weights), 4)


@pytest.mark.parametrize(
    ("ranges", "n", "match"),
    [
        ([], 3, "no stages"),
        ([(1, 2)], 3, "leaves a gap"),
        ([(0, 1), (1, 2)], 3, "overlaps"),
        ([(0, 0), (2, 2)], 3, "leaves a gap"),
        ([(0, 1)], 3, "end at unit 1"),
        ([(0, 3)], 3, "end at unit 3"),
        ([(0, -1), (0, 2)], 3, "empty"),
        ([(0, 0)], 0, "at least one unit"),
    ],
)
def test_check_cover_rejects(ranges, n, match):
    with pytest.raises(ValueError, match=match):
        check_cover(ranges, n)


def test_check_cover_accepts_and_stage_weights():
    check_cover([(0, 1), (2, 2), (3, 5)], 6)
    assert stage_weights([1, 2, 3, 4, 5, 6], [(0, 1), (2, 2), (3, 5)]) == [3.0, 3.0, 15.0]


# ---------------------------------------------------------------- graph


def test_mesh_edges_and_counts():
    edges = build_edges([1, 2, 3], "mesh")
    assert len(edges) == 1 + 1 * 2 + 2 * 3 + 3  # dispatcher->stage0, 0->1, 1->2, stage2->dispatcher
    assert edges == tuple(sorted(edges))
    assert len(set(edges)) == len(edges)
    assert downstream(edges, DISPATCHER) == (Node(0, 0),)
    assert downstream(edges, Node(0, 0)) == (Node(1, 0), Node(1, 1))
    assert downstream(edges, Node(1, 1)) == (Node(2, 0), Node(2, 1), Node(2, 2))
    assert upstream(edges, DISPATCHER) == (Node(2, 0), Node(2, 1), Node(2, 2))
    assert upstream(edges, Node(2, 1)) == (Node(1, 0), Node(1, 1))
    check_paths(edges, [1, 2, 3])


def test_single_stage_graph():
    edges = build_edges([2], "mesh")
    assert edges == (
        (DISPATCHER, Node(0, 0)),
        (DISPATCHER, Node(0, 1)),
        (Node(0, 0), DISPATCHER),
        (Node(0, 1), DISPATCHER),
    )
    assert build_edges([2], "parallel") == edges


def test_parallel_edges():
    edges = build_edges([2, 2, 2], "parallel")
    assert len(edges) == 2 + 2 + 2 + 2
    assert downstream(edges, Node(0, 1)) == (Node(1, 1),)
    assert downstream(edges, Node(1, 0)) == (Node(2, 0),)
    check_paths(edges, [2, 2, 2])


def test_parallel_needs_equal_counts():
    with pytest.raises(ValueError, match="stage 0 has 1 and stage 1 has 2"):
        build_edges([1, 2], "parallel")


def test_explicit_edges():
    pairs = [(Node(0, 0), Node(1, 1)), (Node(0, 1), Node(1, 0)), (Node(0, 0), Node(1, 1))]
    edges = build_edges([2, 2], "explicit", pairs)
    assert len(edges) == 2 + 2 + 2  # duplicate collapsed
    assert downstream(edges, Node(0, 0)) == (Node(1, 1),)
    check_paths(edges, [2, 2])
    # dispatcher edges inside the explicit list are accepted and deduplicated
    with_dispatcher = build_edges([2, 2], "explicit", [*pairs, (DISPATCHER, Node(0, 0))])
    assert with_dispatcher == edges


@pytest.mark.parametrize(
    "pair",
    [
        (Node(0, 0), Node(2, 0)),  # skips a stage
        (Node(1, 0), Node(0, 0)),  # backwards
        (Node(0, 5), Node(1, 0)),  # no such replica
        (DISPATCHER, Node(1, 0)),  # dispatcher feeds only stage 0
    ],
)
def test_explicit_edges_rejected(pair):
    with pytest.raises(ValueError):
        build_edges([1, 1, 1], "explicit", [pair])


def test_explicit_stranded_replica():
    edges = build_edges([2, 1], "explicit", [(Node(0, 0), Node(1, 0))])
    with pytest.raises(ValueError, match="0.1 is stranded.*back to the dispatcher"):
        check_paths(edges, [2, 1])
    edges = build_edges([1, 2], "explicit", [(Node(0, 0), Node(1, 0))])
    with pytest.raises(ValueError, match="1.1 is stranded.*from the dispatcher"):
        check_paths(edges, [1, 2])


def test_build_edges_bad_inputs():
    with pytest.raises(ValueError, match="unknown graph"):
        build_edges([1], "ring")
    with pytest.raises(ValueError, match="at least one stage"):
        build_edges([], "mesh")
    with pytest.raises(ValueError, match="at least 1"):
        build_edges([1, 0], "mesh")
    with pytest.raises(ValueError, match="graph = 'explicit'"):
        build_edges([1, 1], "mesh", [(Node(0, 0), Node(1, 0))])


def test_extra_edges_extend_the_graph():
    loop = (Node(1, 0), Node(0, 0))
    edges = build_edges([1, 1], "mesh", extra=[loop])
    assert loop in edges and len(edges) == 4
    check_paths(edges, [1, 1])
    with pytest.raises(ValueError, match="self-loop"):
        build_edges([1, 1], "mesh", extra=[(Node(0, 0), Node(0, 0))])
    with pytest.raises(ValueError, match="not a node"):
        build_edges([1, 1], "mesh", extra=[(Node(3, 0), Node(0, 0))])


def test_check_paths_unknown_node():
    with pytest.raises(ValueError, match="not a node"):
        check_paths([(DISPATCHER, Node(0, 0)), (Node(0, 0), Node(4, 4))], [1])


# ---------------------------------------------------------------- placement


def test_place_auto():
    assert place("auto", [1, 2], available_cuda=0) == ("cpu", "cpu", "cpu")
    assert place("auto", [2, 2, 1], available_cuda=2) == ("cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0")
    assert place("auto", [1, 1], available_cuda=4) == ("cuda:0", "cuda:1")


def test_place_explicit():
    assert place(["cuda", "cpu", "CUDA:3"], [1, 2]) == ("cuda:0", "cpu", "cuda:3")
    assert place("cuda", [2]) == ("cuda:0", "cuda:0")
    with pytest.raises(ValueError, match="2 devices given for 3"):
        place(["cpu", "cpu"], [1, 2])
    with pytest.raises(ValueError, match="bad device"):
        place(["cpu", "tpu"], [2])
    with pytest.raises(ValueError, match="bad device"):
        place("cuda:x", [1])


# ---------------------------------------------------------------- ports


def test_free_ports_distinct():
    ports = free_ports(20)
    assert len(ports) == 20 and len(set(ports)) == 20
    # Below the ephemeral range: no outgoing connection can take one before its worker binds it.
    assert all(PICK_RANGE[0] <= p < min(PICK_RANGE[1], ephemeral_low()) for p in ports)
    assert free_ports(0) == []


def test_free_ports_skip_taken_ports_and_say_when_too_few_are_free():
    import socket

    first = free_ports(1)[0]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", first))
        with pytest.raises(OSError, match=f"only 0 of 1 ports free in {first}-{first} on 127.0.0.1"):
            free_ports(1, pick_range=(first, first + 1))
    assert free_ports(1, pick_range=(first, first + 1)) == [first]
    with pytest.raises(ValueError, match="cannot pick 3 ports from 100-101"):
        free_ports(3, pick_range=(100, 102))


# ---------------------------------------------------------------- make_plan


def _plan(pipeline: dict[str, Any] | None = None, unchecked: dict[str, Any] | None = None,
          **overrides: Any) -> JobPlan:
    """make_plan over a job config: `pipeline` overrides [pipeline] keys of the file, `unchecked`
    sets PipelineConfig fields after validation (what only make_plan's own checks can catch),
    the rest overrides make_plan's own arguments (ranges, devices, ports)."""
    table = {"stages": 2, "replicas": [1, 2], "policy": "round_robin", "micro_batch_size": 4, "max_inflight": 8,
             **(pipeline or {})}
    cfg = parse_job({"name": "j", "model": {"source": "builtin:gpt2-tiny", "seed": 7}, "pipeline": table},
                    "/tmp/jobs/j.toml")
    cfg = replace(cfg, pipeline=replace(cfg.pipeline, **(unchecked or {})))
    args: dict[str, Any] = dict(ranges=[(0, 1), (2, 4)],
                                devices=place("auto", cfg.pipeline.replicas, available_cuda=2),
                                ports=list(range(5000, 5000 + ports_needed(cfg))), host="127.0.0.1")
    args.update(overrides)
    return make_plan(cfg, **args)


def test_make_plan_end_to_end():
    plan = _plan()
    stages = [(s.index, s.first_unit, s.last_unit, s.replicas) for s in plan.stages]
    assert stages == [(0, 0, 1, 1), (1, 2, 4, 2)]
    assert [(str(w.node), w.device, w.host) for w in plan.workers] == [
        ("0.0", "cuda:0", "127.0.0.1"),
        ("1.0", "cuda:1", "127.0.0.1"),
        ("1.1", "cuda:0", "127.0.0.1"),
    ]
    assert [(e.key, e.port) for e in plan.edges] == [
        ("dispatcher->0.0", 5000),
        ("0.0->1.0", 5001),
        ("0.0->1.1", 5002),
        ("1.0->dispatcher", 5003),
        ("1.1->dispatcher", 5004),
    ]
    assert plan.last_stage == 1
    assert [e.key for e in plan.out_edges(Node(0, 0))] == ["0.0->1.0", "0.0->1.1"]
    assert [e.key for e in plan.in_edges(DISPATCHER)] == ["1.0->dispatcher", "1.1->dispatcher"]
    assert plan.worker(Node(1, 1)).device == "cuda:0"
    assert (plan.policy, plan.micro_batch_size, plan.max_inflight) == ("round_robin", 4, 8)
    assert (plan.dispatcher_host, plan.base_dir, plan.seed) == ("127.0.0.1", "/tmp/jobs", 7)
    assert (plan.job, plan.model_source, plan.dtype, plan.graph) == ("j", "builtin:gpt2-tiny", "float32", "mesh")
    assert plan.generation is None


def test_make_plan_carries_every_pipeline_key_it_is_given():
    """The config travels whole: each [pipeline] and [generation] key the workers read reaches the plan."""
    keys = {"policy": "weighted", "micro_batch_size": 3, "max_inflight": 5, "max_wait_ms": 7.5,
            "edge_timeout_s": 9.0, "cuda_graphs": False, "compile": True}
    plan = _plan(keys)
    assert {k: getattr(plan, {"compile": "compile_layers"}.get(k, k)) for k in keys} == keys
    cfg = parse_job({"model": {"source": "builtin:llama-tiny"},
                     "pipeline": {"stages": 2, "replicas": [2, 2], "graph": "parallel"},
                     "generation": {"kv_budget_tokens": 640, "max_batch_sequences": 3, "max_new_tokens": 5}})
    plan = make_plan(cfg, [(0, 1), (2, 3)], ["cpu"] * 4, list(range(6000, 6000 + ports_needed(cfg))), "h")
    gen = plan.generation
    assert gen is not None
    assert (gen.kv_budget_tokens, gen.max_batch_sequences, gen.default_max_new_tokens) == (640, 3, 5)
    assert gen.micro_batches_in_flight == 2  # 0 in the file: one per stage
    assert {e.key for e in plan.edges} >= {"1.0->0.0", "1.1->0.1"}  # the decode loop of each chain


def test_a_generation_plan_of_an_older_writer_keeps_its_fields() -> None:
    """The generation fields travel as a list, each new one appended: a plan stored by an older
    controller (4 fields, or 5 with the warm-up) reads as it was written, and a new one round-trips."""
    from infscaled.protocol.plan import GenerationPlan, plan_from_dict, plan_to_dict

    cfg = parse_job({"model": {"source": "builtin:llama-tiny"}, "pipeline": {"stages": 2},
                     "generation": {"max_batch_sequences": 3, "prefill_chunk_tokens": 64, "warmup_s": 7.5}})
    doc = plan_to_dict(make_plan(cfg, [(0, 1), (2, 3)], ["cpu"] * 2, list(range(6000, 6000 + ports_needed(cfg))),
                                 "h"))
    gen = plan_from_dict(doc).generation
    assert gen is not None and (gen.prefill_chunk_tokens, gen.warmup_s) == (64, 7.5)
    for fields, want in ((5, (GenerationPlan.prefill_chunk_tokens, 7.5)),
                         (4, (GenerationPlan.prefill_chunk_tokens, GenerationPlan.warmup_s))):
        older = plan_from_dict({**doc, "generation": doc["generation"][:fields]}).generation  # type: ignore[index]
        assert older is not None
        assert (older.max_batch_sequences, older.prefill_chunk_tokens, older.warmup_s) == (3, *want)
    with pytest.raises(TypeError, match="generation: expected a list of 4 to 6 numbers"):
        plan_from_dict({**doc, "generation": [1, 2, 3]})


def test_make_plan_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="2 stage ranges but 3"):
        _plan({"stages": 3, "replicas": [1, 1, 1]})
    with pytest.raises(ValueError, match="leaves a gap"):
        _plan(ranges=[(0, 1), (3, 4)])
    with pytest.raises(ValueError, match="unknown routing policy"):
        _plan(unchecked={"policy": "fastest"})
    with pytest.raises(ValueError, match="distinct"):
        _plan(ports=[5000] * 5)
    with pytest.raises(ValueError, match="2 devices for 3"):
        _plan(devices=["cpu", "cpu"])
    with pytest.raises(AssertionError):
        _plan(ports=[5000, 5001])
    with pytest.raises(ValueError, match="stranded"):
        _plan(unchecked={"graph": "explicit", "edges": (("0.0", "1.0"),)}, ports=list(range(4)))


def test_run_port_range_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from infscaled.errors import InfscaledError

    monkeypatch.delenv(PORTS_ENV, raising=False)
    assert run_port_range() == PICK_RANGE
    monkeypatch.setenv(PORTS_ENV, "15000-15009")
    assert run_port_range() == (15000, 15010)
    assert all(15000 <= p <= 15009 for p in free_ports(5))
    for bad in ("15000", "x-2", "20000-19999", "0-10"):
        monkeypatch.setenv(PORTS_ENV, bad)
        with pytest.raises(InfscaledError, match=f"INFSCALED_RUN_PORTS = '{bad}': expected FIRST-LAST"):
            run_port_range()


def test_one_stage_generation_keeps_two_micro_batches_in_flight_unless_told() -> None:
    """0 means one per stage, but at least 2 (planning/job.py says why); the file's value wins."""
    from infscaled.planning.job import generation_plan

    base = {"name": "g", "model": {"source": "builtin:llama-tiny"}, "pipeline": {"stages": 1},
            "generation": {"max_batch_sequences": 4}}
    assert generation_plan(parse_job(base, "g.toml")).micro_batches_in_flight == 2  # type: ignore[union-attr]
    base["generation"] = {"max_batch_sequences": 4, "micro_batches_in_flight": 1}
    assert generation_plan(parse_job(base, "g.toml")).micro_batches_in_flight == 1  # type: ignore[union-attr]
