"""The decode warm-up before READY (generation/warmup.py): which buckets, in which order, within
which caps; the StageKV exactly as empty afterwards; generation after it still HF `generate`'s;
the job key `generation.warmup_s` from the file to the plan, and its bad values.

CUDA graphs need a GPU: here the stages' DecodeSteps run with graphs forced on and the capture
replaced by a recorder (as tests/test_decode_graphs.py does), so every warm-up step runs eagerly
on its bucket's static batch and the buckets it offers for capture are recorded. The last test
(marked gpu, run on the device) checks the real thing: after warm-up, a sequence's first decode
steps replay CUDA graphs.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import pytest
import torch
from test_generation_pipeline import hf_greedy

from infscaled.config import ConfigError, parse_job
from infscaled.engine.core import Engine, EngineSettings
from infscaled.engine.programs.generation import GenerationStage
from infscaled.generation.kv import PAGE_TOKENS
from infscaled.generation.warmup import WARMUP_TOKENS, plan_buckets, sizes, warm_up, widest_tokens
from infscaled.models.sources import resolve
from infscaled.models.stage import Monolith, build_stage
from infscaled.protocol.plan import GenerationPlan, Node, plan_from_dict, plan_to_dict

MODEL = "builtin:llama-tiny"  # 4 layers, hidden 64, 256 positions (16 pages)


def test_buckets_largest_rows_first_narrow_widths_first_within_the_caps() -> None:
    assert sizes(5, 8) == [1, 2, 4, 8] and sizes(4, 8) == [1, 2, 4] and sizes(12, 12) == [1, 2, 4, 8, 12]
    assert sizes(100, 6) == [1, 2, 4, 6] and sizes(1, 1) == [1]
    # max_batch_sequences 12: DecodeStep forms row buckets 12, 8, 4, 2, 1; reservations up to 100
    # tokens take 7 pages: widths 1, 2, 4, 8 (a pool of 64 pages).
    plan = plan_buckets(12, 64, 100, 100)
    assert plan[:4] == [(12, 1), (12, 2), (12, 4), (12, 8)] and plan[4] == (8, 1) and plan[-1] == (1, 8)
    assert len(plan) == 5 * 4
    assert plan_buckets(12, 64, 100, 6) == plan[:6]  # the graph cap keeps the most useful ones
    # A pool of 5 pages: the widest table is the whole pool, as DecodeStep rounds it.
    assert plan_buckets(1, 5, 10_000, 100) == [(1, 1), (1, 2), (1, 4), (1, 5)]
    # Reservations are bounded by the warm-up horizon, the KV budget and the model's positions.
    assert widest_tokens(1 << 20, 0) == WARMUP_TOKENS
    assert widest_tokens(300, 4096) == 300 and widest_tokens(1 << 20, 256) == 256


def test_warmup_s_reaches_the_plan_and_rejects_bad_values() -> None:
    from infscaled.runner.launcher import prepare

    base = {"name": "w", "model": {"source": MODEL}, "pipeline": {"stages": 1}}
    cfg = parse_job({**base, "generation": {}})
    assert cfg.generation is not None and cfg.generation.warmup_s == 30.0
    plan = prepare(parse_job({**base, "generation": {"warmup_s": 7.5}})).plan
    assert plan.generation is not None and plan.generation.warmup_s == 7.5
    assert plan_from_dict(plan_to_dict(plan)).generation == plan.generation
    older = plan_to_dict(plan)
    older["generation"] = older["generation"][:4]  # type: ignore[index]  # a plan written before the key
    assert plan_from_dict(older).generation == replace(plan.generation, warmup_s=GenerationPlan.warmup_s,
                                                       prefill_chunk_tokens=GenerationPlan.prefill_chunk_tokens)
    for bad, why in ((-1, "out of range"), (1e6, "out of range"), ("30", "expected a number"),
                     (True, "expected a number")):
        with pytest.raises(ConfigError, match=f"generation.warmup_s.*{why}"):
            parse_job({**base, "generation": {"warmup_s": bad}})


def _stages(monkeypatch: Any, count: int, budget: int = 1024, max_rows: int = 4) -> tuple[list[GenerationStage],
                                                                                            list[list[Any]]]:
    """Real GenerationStages of llama-tiny on the CPU, each attached to an engine (no edges), their
    decode steps with graphs forced on and capture recorded (see the module docstring)."""
    resolved = resolve(MODEL)
    units = resolved.family.config.num_hidden_layers + 2
    cuts = [round(i * units / count) for i in range(count + 1)]
    plan = GenerationPlan(budget, max_rows, 2, 16)
    programs, offered = [], []
    for i in range(count):
        stage = build_stage(resolved, cuts[i], cuts[i + 1] - 1, "cpu", "float32", 0)
        program = GenerationStage(stage, "cpu", plan, count)
        Engine(Node(i, 0), program, EngineSettings("127.0.0.1"), lambda edge: None)  # attaches: the DecodeStep
        program.decoder.graphs = True
        keys: list[Any] = []

        def record(b: Any, key: tuple[int, int], keys: list[Any] = keys) -> None:
            keys.append(key)
            b.eager = True  # as after a failed capture: the bucket runs eagerly on its static batch

        monkeypatch.setattr(program.decoder, "_capture", record)
        programs.append(program)
        offered.append(keys)
    return programs, offered


def _generate(programs: list[GenerationStage], work: list[tuple[list[int], int]]) -> list[list[int]]:
    """Greedy generation through the stages in this process (prefill one sequence at a time, then
    decode steps of every live sequence through the stages' DecodeSteps), as the chain would."""
    out: dict[int, list[int]] = {}
    live: dict[int, int] = {}  # sequence -> tokens still to make
    with torch.inference_mode():
        for s, (prompt, new) in enumerate(work):
            act: dict[str, torch.Tensor] = {"input_ids": torch.tensor([prompt])}
            for p in programs:
                batch = p.kv.prefill([s], [len(prompt)], [len(prompt) + new])
                mask = torch.ones(1, len(prompt), dtype=torch.int64)
                act = p.stage({**({"hidden": act["hidden"]} if "hidden" in act else act), "attention_mask": mask},
                              batch)
                p.kv.store([s], batch)
            out[s], live[s] = [int(act["output"][0, -1].argmax())], new - 1
        while live:
            seqs = [s for s in live if live[s] > 0]
            x = torch.tensor([[out[s][-1]] for s in seqs])
            for p in programs:
                step = p.decoder.step(x, seqs)
                x = step.get("hidden", step.get("output"))
            logits = x[:, -1] if x.dim() == 3 else x
            for s, tok in zip(seqs, logits.argmax(-1).tolist(), strict=True):
                out[s].append(tok)
                live[s] -= 1
            for s in [s for s in live if live[s] == 0]:
                del live[s]
                for p in programs:
                    p.kv.free([s])
    return [out[s] for s in range(len(work))]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_warm_up_leaves_the_cache_empty_and_generation_exact(monkeypatch: Any) -> None:
    """Two stages (the second takes hidden states): every planned bucket is stepped and offered
    for capture once, in plan order; the caches end as they began; the generation that follows
    runs on the warmed buckets' static batches and equals HF generate."""
    resolved = resolve(MODEL)
    programs, offered = _stages(monkeypatch, 2)
    # Rows 4, 2, 1 x widths 1..16 pages (256 positions): 15 buckets, of which the warm-up takes
    # three quarters of the 16 graphs DecodeStep allows with this attention backend.
    assert programs[0].decoder.max_graphs == 16
    want = plan_buckets(4, programs[0].kv.page_count, 256, 12)
    assert len(want) == 12 and want[-1] == (1, 2)
    for p, keys in zip(programs, offered, strict=True):
        warmed = warm_up(p.decoder, 60.0, 600.0, resolved.family, torch.float32)
        assert warmed is not None and list(warmed.stepped) == want and warmed.planned == len(want)
        assert keys == want and warmed.captured == ()  # each offered on its second step
        assert "12 of 12 buckets run" in warmed.describe()
        kv = p.kv
        assert kv.seqs == {} and kv.reserved == {} and kv.pages == {} and kv.reserved_tokens == 0
        assert kv.fits(kv.budget_tokens) and p.decoder.replays == 0
        layers = [u.layer.self_attn.layer_idx for u in p.stage.units if hasattr(u, "layer")]
        assert len(layers) == 2 and all(kv.pools_of(i) is not None for i in layers)  # allocated by the prefill
    # The free pages' order is the fresh pool's: the next reservation gets pages 0, 1, ...
    probe = programs[0].kv
    probe.prefill([99], [1], [3 * PAGE_TOKENS])
    assert probe.pages[99] == [0, 1, 2]
    probe.free([99])
    mono = Monolith(resolved, "cpu", "float32", 0)
    gen = torch.Generator().manual_seed(3)
    work = [(torch.randint(0, 512, (n,), generator=gen).tolist(), new) for n, new in ((5, 9), (19, 6), (2, 12))]
    assert _generate(programs, work) == [hf_greedy(mono, p, n) for p, n in work]
    assert all(p.kv.seqs == {} for p in programs)


def test_warm_up_off_without_graphs_and_within_its_budget(monkeypatch: Any) -> None:
    resolved = resolve(MODEL)
    (program,), (offered,) = _stages(monkeypatch, 1, budget=64, max_rows=2)
    assert warm_up(program.decoder, 0.0, 600.0, resolved.family, torch.float32) is None  # warmup_s = 0: off
    program.decoder.graphs = False
    assert warm_up(program.decoder, 60.0, 600.0, resolved.family, torch.float32) is None  # nothing to capture
    program.decoder.graphs = True
    # A budget shorter than the pools' prefill: no bucket starts, and the cache is empty again.
    warmed = warm_up(program.decoder, 1e-6, 600.0, resolved.family, torch.float32)
    assert warmed is not None and warmed.stepped == () and warmed.planned == 2 * 3  # rows 2, 1 x 4 pages
    assert "0 of 6 buckets run" in warmed.describe() and "captured on first use" in warmed.describe()
    # The READY timeout caps the budget too: half of what is left.
    warmed = warm_up(program.decoder, 60.0, 2e-6, resolved.family, torch.float32)
    assert warmed is not None and warmed.budget_s == 1e-6 and warmed.stepped == ()
    assert offered == [] and program.kv.seqs == {} and program.kv.fits(64)


def test_prefill_buckets_are_every_shape_a_prefill_can_take() -> None:
    from infscaled.generation.graphs import PREFILL_GRAPH_TOKENS, PrefillStep
    from infscaled.generation.kv import StageKV

    for max_rows in (1, 4, 12, 64, 128):
        step = PrefillStep(torch.nn.Module(), StageKV(64), torch.device("cpu"), "input_ids", max_rows, False)
        step.graphs = True  # (key() answers for a graph-capable stage; nothing runs here)
        buckets = step.buckets()
        formed = {step.key(r, c, last_logits=True) for r in range(1, max_rows + 1)
                  for c in range(1, PREFILL_GRAPH_TOKENS + 1, 7)} - {None}
        assert formed == set(buckets) and step.max_graphs == len(buckets)
    assert len(buckets) == 36 and buckets[:2] == [(1, 16), (1, 32)] and buckets[-1] == (128, 16)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_prefill_warm_up_runs_every_bucket_and_leaves_the_cache_as_it_was(monkeypatch: Any) -> None:
    """After the decode buckets, the prefill buckets (PrefillStep's, capture recorded as above):
    every one the model's positions and the KV budget allow, rows then columns ascending, each
    offered for capture once; the cache ends as it began; a prefill after it is exact."""
    resolved = resolve(MODEL)
    (program,), _ = _stages(monkeypatch, 1, budget=1024, max_rows=4)
    prefills = program.prefills
    prefills.graphs = True
    offered: list[tuple[int, int]] = []

    def record(b: Any, key: tuple[int, int]) -> None:
        offered.append(key)
        b.eager = True

    monkeypatch.setattr(prefills, "_capture", record)
    warmed = warm_up(program.decoder, 60.0, 600.0, resolved.family, torch.float32, prefills)
    assert warmed is not None and warmed.prefill is not None
    # Rows 1, 2, 4 x columns 16..256 (llama-tiny's 256 positions), within 1024 tokens: 1 x 16..256,
    # 2 x 16..256, 4 x 16..256 — 4 x 256 (1,024 tokens) fits exactly.
    want = [(r, c) for r in (1, 2, 4) for c in (16, 32, 64, 128, 256)]
    assert list(warmed.prefill.stepped) == want and offered == want and warmed.prefill.planned == len(want)
    assert "prefill warm-up: 15 of 15 buckets run" in warmed.prefill.describe()
    assert "rows x tokens: 1x16 1x32" in warmed.prefill.describe()
    kv = program.kv
    assert kv.seqs == {} and kv.reserved == {} and kv.pages == {} and kv.reserved_tokens == 0
    assert prefills.replays == 0
    kv.prefill([99], [1], [3 * PAGE_TOKENS])
    assert kv.pages[99] == [0, 1, 2]  # the free pages' order is the fresh pool's
    kv.free([99])
    # A prompt of 9 tokens through its warmed bucket (1 x 16) gives the monolith's logits.
    prompt = torch.tensor([[5, 77, 3, 120, 9, 41, 8, 200, 17]])
    with torch.inference_mode():
        key = prefills.key(1, 9, last_logits=True)
        assert key == (1, 16)
        got = prefills.step(key, prompt, [0], [9], [32])["output"]
        want_logits = Monolith(resolved, "cpu", "float32", 0).model(prompt).logits[:, -1]
    torch.testing.assert_close(got, want_logits, rtol=1e-4, atol=1e-4)
    kv.free([0])
    # A KV budget under a bucket's tokens leaves that bucket to first use; the time budget caps.
    (small,), _ = _stages(monkeypatch, 1, budget=256, max_rows=4)
    small.prefills.graphs = True
    monkeypatch.setattr(small.prefills, "_capture", record)
    warmed = warm_up(small.decoder, 60.0, 600.0, resolved.family, torch.float32, small.prefills)
    assert warmed is not None and warmed.prefill is not None
    assert all(r * c <= 256 for r, c in warmed.prefill.stepped) and (4, 64) in warmed.prefill.stepped
    assert (2, 256) not in warmed.prefill.stepped
    from infscaled.generation.warmup import warm_prefill
    none = warm_prefill(small.prefills, 0.0, 64, torch.float32)
    assert none.stepped == () and "captured on first use" in none.describe() and small.kv.seqs == {}


GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(GPUS < 1, reason="needs CUDA")
@pytest.mark.parametrize(("stages", "compiled", "warmup_s"),
                         [(1, False, 30.0), (1, False, 0.0), (2, False, 30.0), (1, True, 120.0)])
def test_after_warm_up_the_first_decode_steps_replay_graphs(stages: int, compiled: bool, warmup_s: float) -> None:
    """One sequence (7 new tokens: the prefill's, then 6 decode steps) on a fresh job: with the
    warm-up every decode step replays a graph at every stage; without it, the bucket's first step
    runs eagerly and the second captures (5 replays). Tokens equal HF generate; the caches end empty."""
    from test_generation_pipeline import Collected

    from infscaled.generation.params import SamplingParams
    from infscaled.runner.launcher import LocalJob, prepare

    devices = ["cuda:0", "cuda:1" if GPUS > 1 else "cuda:0"][:stages]
    cfg = parse_job({"name": "warm-gpu", "model": {"source": MODEL},
                     "pipeline": {"stages": stages, "cuda_graphs": True, "compile": compiled},
                     "placement": {"devices": devices},
                     "generation": {"max_batch_sequences": 2, "warmup_s": warmup_s}})
    prompt, new = [7, 3, 99, 12, 5], 7
    expected = hf_greedy(Monolith(resolve(MODEL), "cpu", "float32", 0), prompt, new)
    steps = new - 1
    with LocalJob(prepare(cfg)) as job:
        got = Collected()
        job.generator.submit(prompt, SamplingParams(max_new_tokens=new, temperature=0.0), got)
        assert got.done.wait(120) and got.error is None
        assert got.tokens == expected
        want = steps if warmup_s > 0 else steps - 1
        deadline = time.monotonic() + 15  # stats arrive every second
        while True:
            stats = [job.group.handles[Node(s, 0)].stats for s in range(stages)]
            replays = [s.graph_replays if s is not None else -1 for s in stats]
            freed = all(s is not None and s.kv_sequences == 0 for s in stats)
            if all(r >= want for r in replays) and freed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        print(f"warmup_s {warmup_s}, compile {compiled}: graph replays per stage {replays} for {steps} decode steps")
        assert replays == [want] * stages
        assert all(s is not None and s.kv_sequences == 0 and s.kv_reserved_tokens == 0 for s in stats)


def test_a_generation_stage_stages_only_the_activations_of_the_stage_before(monkeypatch: Any) -> None:
    """engine/cuda.py's receivers copy onto a CUDA stage's device what `Program.staged` picks: for a
    generation stage only the activations (`x`) from the stage before; stage 0's prompts from the
    dispatcher, tokens round the loop and every table, spec, mask and free list stay host data
    (their values decide on the host). A forward stage stages all but tables and masks."""
    from infscaled.engine.edges import EdgeEnd
    from infscaled.engine.programs.forward import ForwardStage
    from infscaled.protocol import generation as g
    from infscaled.protocol.plan import DISPATCHER, EdgePlan
    from infscaled.worker.router import Router

    programs, _ = _stages(monkeypatch, 2)
    first, second = Node(0, 0), Node(1, 0)
    from_stage = EdgeEnd(EdgePlan(first, second, "127.0.0.1", 1), second)
    from_dispatcher = EdgeEnd(EdgePlan(DISPATCHER, first, "127.0.0.1", 2), first)
    round_the_loop = EdgeEnd(EdgePlan(second, first, "127.0.0.1", 3), first)
    host = (g.REQUESTS, g.MASK, g.SPECS, g.FREE_IDS, g.STARTS, g.TOKENS, g.DONE)
    assert programs[1].staged(from_stage, g.X)
    assert not any(programs[1].staged(from_stage, k) for k in host)
    assert not any(programs[0].staged(end, k) for end in (from_dispatcher, round_the_loop) for k in (g.X, *host))
    forward = ForwardStage(build_stage(resolve(MODEL), 0, 1, "cpu", "float32", 0), "cpu", Router("round_robin"))
    assert forward.staged(from_stage, "input_ids") and forward.staged(from_stage, "hidden")
    assert not forward.staged(from_stage, "requests") and not forward.staged(from_stage, "attention_mask")
