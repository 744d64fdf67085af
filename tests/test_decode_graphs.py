"""Decode steps on static, padded batches (what CUDA graphs replay) compute what exact batches do.

CUDA graphs themselves need a GPU (tests/test_gpu_generation.py, run on the device); here the
bucket logic runs on the CPU: `DecodeStep` with graphs forced on and capture replaced by a
recorder, so every step runs eagerly on its bucket's static batch, padding rows included. Its
outputs for the real rows must equal those of a second cache stepped with exact batches.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from infscaled.generation.graphs import DecodeStep, bucket
from infscaled.generation.kv import PAGE_TOKENS, StageKV
from infscaled.models.sources import resolve
from infscaled.models.stage import build_stage


def test_bucket_rounds_up_to_powers_of_two_within_the_cap() -> None:
    assert [bucket(n, 8) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    assert [bucket(n, 6) for n in (3, 5, 6)] == [4, 6, 6]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize(("model", "attention"), [("llama-tiny", "torch"), ("gpt2-tiny", "torch"),
                                                  ("llama-tiny", "flex")])
def test_padded_static_batches_compute_what_exact_batches_do(model: str, attention: str, monkeypatch: Any) -> None:
    """`attention`: the padded stepper's paged attention backend (the exact one's is "torch"):
    flex reads the pools through the block mask and StageKV.page_index (uncompiled on the CPU)."""
    torch.manual_seed(0)
    resolved = resolve(f"builtin:{model}")
    stage = build_stage(resolved, 0, 2, "cpu", "float32", 0).eval()  # embed + 2 blocks
    kvs = [StageKV(1024), StageKV(1024)]
    exact = DecodeStep(stage, kvs[0], torch.device("cpu"), "input_ids", max_rows=8, graphs=False)
    padded = DecodeStep(stage, kvs[1], torch.device("cpu"), "input_ids", max_rows=8, graphs=False,
                        attention=attention)
    padded.graphs = True  # as on a GPU, but capture is recorded instead of done
    captured: list[tuple[int, int]] = []

    def fake_capture(b: Any, key: tuple[int, int]) -> None:
        captured.append(key)
        b.eager = True  # as after a failed capture: the bucket keeps running eagerly, static batch

    monkeypatch.setattr(padded, "_capture", fake_capture)
    prompts = {1: [5, 6, 7], 2: [9] * 20, 3: [4, 2], 4: [8, 8, 8, 8, 8]}
    reserve = {1: 10, 2: 40, 3: 12, 4: 14}
    with torch.inference_mode():
        for kv in kvs:
            for s, p in prompts.items():
                batch = kv.prefill([s], [len(p)], [reserve[s]])
                stage({"input_ids": torch.tensor([p]), "attention_mask": torch.ones(1, len(p), dtype=torch.int64)},
                      batch)
                kv.store([s], batch)
        groups = [[1, 3, 4], [2, 1, 3, 4], [4], [1, 3, 4], [3, 2], [1, 3, 4]]
        for step, seqs in enumerate(groups):
            x = torch.tensor([[step + s] for s in seqs])
            want = exact.step(x, seqs)["hidden"]
            got = padded.step(x, seqs)["hidden"]
            assert got.shape == want.shape == (len(seqs), 1, stage_width(resolved))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert kvs[0].length == kvs[1].length
    # Buckets: (rows, pages) rounded up to powers of two; [1, 3, 4] ran three times, so it was
    # offered for capture on its second step only (never again once it stayed eager).
    assert captured == [(4, 1)]


def stage_width(resolved: Any) -> int:
    config = resolved.family.config
    return int(getattr(config, "hidden_size", None) or config.n_embd)


def test_compile_job_option_reaches_the_plan_and_rejects_non_booleans() -> None:
    from infscaled.config import ConfigError, parse_job
    from infscaled.protocol.plan import plan_from_dict, plan_to_dict
    from infscaled.runner.launcher import prepare

    base = {"name": "c", "model": {"source": "builtin:llama-tiny"}, "generation": {}}
    assert parse_job({**base, "pipeline": {"stages": 1}}).pipeline.compile is False
    cfg = parse_job({**base, "pipeline": {"stages": 1, "compile": True}})
    plan = prepare(cfg).plan
    assert plan.compile_layers is True and plan_from_dict(plan_to_dict(plan)).compile_layers is True
    with pytest.raises(ConfigError, match="pipeline.compile"):
        parse_job({**base, "pipeline": {"stages": 1, "compile": "yes"}})


@pytest.mark.parametrize(("model", "fused"), [("llama-tiny", False), ("gpt2-tiny", False), ("llama-tiny", True)])
def test_compiled_layers_share_one_graph_and_compute_what_eager_layers_do(model: str, fused: bool,
                                                                         monkeypatch: Any) -> None:
    """compile_stage on the CPU with dynamo's "eager" backend (the trace without code generation,
    which on a CPU would take minutes): every layer of the stage must reuse one graph per shape
    (one for the decode bucket, one for forward micro-batches; none per layer), prefills stay
    eager (fused: compiled with dynamic shapes around the attention, forward micro-batches
    too), and the outputs
    equal the uncompiled stage's. Decode steps run on static buckets (as
    under CUDA graphs; capture replaced as in the test above): compiled layers only run those.
    `fused`: the compiled stage's decode steps take the fused projections (fused_decode.py), one
    compiled decode graph for every layer; the reference stays the unfused, uncompiled one."""
    from torch._dynamo.utils import counters

    from infscaled.models.stage import compile_stage, fuse_stage

    torch.manual_seed(0)
    resolved = resolve(f"builtin:{model}")
    stages = [build_stage(resolved, 0, 3, "cpu", "float32", 0).eval() for _ in range(2)]
    torch._dynamo.reset()
    counters.clear()
    assert compile_stage(stages[1], backend="eager") == 3
    if fused:
        assert fuse_stage(stages[1]) == 3
    outs: list[list[torch.Tensor]] = [[], []]
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.int64)
    with torch.inference_mode():
        for stage, out in zip(stages, outs, strict=True):
            kv = StageKV(1024)
            step = DecodeStep(stage, kv, torch.device("cpu"), "input_ids", max_rows=8, graphs=False)
            step.graphs = True
            monkeypatch.setattr(step, "_capture", lambda b, key: setattr(b, "eager", True))
            batch = kv.prefill([1, 2], [5, 7], [40, 40])
            out.append(stage({"input_ids": ids, "attention_mask": mask}, batch)["hidden"])
            kv.store([1, 2], batch)
            batch = kv.prefill([5, 6], [4, 5], [40, 40])  # another prompt length: no new graph
            short = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
            out.append(stage({"input_ids": ids[:, :5], "attention_mask": short}, batch)["hidden"][:, :4])
            kv.store([5, 6], batch)
            for i in range(3):
                out.append(step.step(torch.tensor([[3 + i], [4 + i]]), [1, 2])["hidden"])
            out.append(stage({"input_ids": ids, "attention_mask": mask})["hidden"])  # a forward micro-batch
    for got, want in zip(outs[1], outs[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # One graph for the decode bucket, one for forward micro-batches; fused: the decode bucket and
    # the prefill's two parts around its attention (dynamic shapes), every layer sharing them, which
    # forward micro-batches run too.
    assert counters["stats"]["unique_graphs"] == (3 if fused else 2), dict(counters["stats"])


def test_prefill_positions_go_to_their_pages() -> None:
    """kv.py's prefill index (built in numpy): in a chunk padded to T columns, row i's position t
    goes to slot page * PAGE + offset of page pages[t // PAGE], offset t % PAGE, for prompts of
    different lengths; padding columns go to the scratch page; a width too narrow is an error."""
    kv = StageKV(4096)
    seqs, lengths = [3, 5, 9], [5, 40, 17]
    batch = kv.prefill(seqs, lengths, [64, 64, 100])
    width = 41
    slots = batch.slots(width).tolist()
    scratch = kv.scratch_page * PAGE_TOKENS
    expected = [kv.pages[s][t // PAGE_TOKENS] * PAGE_TOKENS + t % PAGE_TOKENS if t < n else scratch
                for s, n in zip(seqs, lengths, strict=True) for t in range(width)]
    assert slots == expected
    assert batch.slots(width) is batch.slots(width)  # made once per width
    with pytest.raises(ValueError, match="does not fit 39 columns"):
        batch.slots(39)


def assert_same_cache(kvs: list[StageKV], seqs: Any, layers: int = 4) -> None:
    """Every cached key and value of `seqs` in the first StageKV equals the second's (each in its
    own pages)."""
    for layer in range(layers):
        pools = [kv.pools_of(layer) for kv in kvs]
        for s in seqs:
            for j in range(2):
                mine = pools[0][j][kvs[0].pages[s]].flatten(0, 1)[:kvs[0].length[s]]  # type: ignore[index]
                theirs = pools[1][j][kvs[1].pages[s]].flatten(0, 1)[:kvs[1].length[s]]  # type: ignore[index]
                torch.testing.assert_close(theirs, mine)


def test_prefills_on_static_buckets_compute_what_exact_prefills_do(monkeypatch: Any) -> None:
    """`PrefillStep` with graphs forced on (capture replaced as above): prompts of 5, 9 and 3
    tokens padded into a 4 x 16 bucket give the real rows' next-token logits and write the same
    keys and values into their pages as an exact prefill; a prompt asking for every position's
    logits, too many rows or an unfused stage take the eager path (no bucket)."""
    from infscaled.generation.graphs import PrefillStep
    from infscaled.models.stage import fuse_stage

    resolved = resolve("builtin:llama-tiny")
    stages = [build_stage(resolved, 0, 5, "cpu", "float32", 0).eval() for _ in range(2)]
    for stage in stages:
        fuse_stage(stage)
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 9, 3]
    ids = torch.zeros(3, 9, dtype=torch.int64)
    mask = torch.zeros(3, 9, dtype=torch.int64)
    for i, n in enumerate(lengths):
        ids[i, :n], mask[i, :n] = torch.randint(0, 512, (n,), generator=gen), 1
    seqs, reserves = [4, 7, 9], [40, 40, 40]
    kvs = [StageKV(1024) for _ in stages]
    with torch.inference_mode():
        batch = kvs[0].prefill(seqs, lengths, reserves)
        batch.last_logits = True
        want = stages[0]({"input_ids": ids, "attention_mask": mask}, batch)["output"]
        kvs[0].store(seqs, batch)
        step = PrefillStep(stages[1], kvs[1], torch.device("cpu"), "input_ids", max_rows=8, graphs=False)
        step.graphs = True
        monkeypatch.setattr(step, "_capture", lambda b, key: setattr(b, "eager", True))
        key = step.key(3, 9, last_logits=True)
        assert key == (4, 16)
        got = step.step(key, ids, seqs, lengths, reserves)["output"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert kvs[1].length == kvs[0].length == dict(zip(seqs, lengths, strict=True))
    assert_same_cache(kvs, seqs)
    assert step.key(3, 9, last_logits=True, pages=3) == (4, 16, 4)  # later chunks: a bucket with pages
    assert step.key(3, 9, last_logits=False) is None
    assert step.key(9, 9, last_logits=True) is None
    assert step.key(1, 4096, last_logits=True) is None  # more than PREFILL_GRAPH_TOKENS
    unfused = PrefillStep(build_stage(resolved, 0, 5, "cpu", "float32", 0), StageKV(64), torch.device("cpu"),
                          "input_ids", max_rows=8, graphs=True)
    assert step.fused and not unfused.fused  # (unfused layers prefill through transformers: eager)


def test_later_chunks_on_static_buckets_compute_what_exact_chunked_prefills_do(monkeypatch: Any) -> None:
    """Prefills with past in `PrefillStep` buckets (graphs forced on, capture replaced as above, so
    every micro-batch runs on the bucket's static tensors, as a replay would): prompts of 37, 20
    and 11 tokens in chunks, a later chunk beside a fresh prompt in one micro-batch, the same
    bucket reused by other sequences at other positions (its page tables, positions and past mask
    refilled in place). Every chunk's next-token logits and every cached key and value equal
    those of exact eager prefills of the same chunks."""
    from infscaled.generation.graphs import PrefillStep, past_pages
    from infscaled.models.stage import fuse_stage

    resolved = resolve("builtin:llama-tiny")
    stages = [build_stage(resolved, 0, 5, "cpu", "float32", 0).eval() for _ in range(2)]
    for stage in stages:
        fuse_stage(stage)
    gen = torch.Generator().manual_seed(2)
    prompts = {s: torch.randint(0, 512, (n,), generator=gen)
               for s, n in ((1, 37), (2, 20), (3, 11), (4, 30), (5, 7), (6, 25))}
    # micro-batches of (sequence, start, length) rows, in the order a chunked queue forms them
    plan = [[(1, 0, 16)], [(1, 16, 16), (2, 0, 9)], [(1, 32, 5), (2, 9, 11), (3, 0, 11)],
            [(4, 0, 16)], [(5, 0, 7), (4, 16, 14)], [(6, 0, 16)], [(6, 16, 9)]]
    kvs = [StageKV(1024) for _ in stages]
    step = PrefillStep(stages[1], kvs[1], torch.device("cpu"), "input_ids", max_rows=4, graphs=False)
    step.graphs = True
    monkeypatch.setattr(step, "_capture", lambda b, key: setattr(b, "eager", True))
    keys = []
    with torch.inference_mode():
        for rows in plan:
            seqs, starts, lengths = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
            width = max(lengths)
            ids = torch.zeros(len(rows), width, dtype=torch.int64)
            mask = torch.zeros(len(rows), width, dtype=torch.int64)
            for i, (s, a, n) in enumerate(rows):
                ids[i, :n], mask[i, :n] = prompts[s][a:a + n], 1
            reserves = [64] * len(rows)
            batch = kvs[0].prefill(seqs, lengths, reserves, starts)
            batch.last_logits = True
            act = {"input_ids": ids, "attention_mask": mask}
            if any(starts):
                act["position_ids"] = torch.tensor(starts).unsqueeze(1) + torch.arange(width)
            want = stages[0](act, batch)["output"]
            kvs[0].store(seqs, batch)
            key = step.key(len(rows), width, True, past_pages(starts, lengths))
            assert key is not None
            keys.append(key)
            got = step.step(key, ids, seqs, lengths, reserves, starts)["output"]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert keys == [(1, 16), (2, 16, 2), (4, 16, 4), (1, 16), (2, 16, 2), (1, 16), (1, 16, 2)]
    assert step._buckets[(2, 16, 2)].steps == 2  # reused: other sequences, other starts per row
    assert kvs[1].length == kvs[0].length == {1: 37, 2: 20, 3: 11, 4: 30, 5: 7, 6: 25}
    assert_same_cache(kvs, prompts)


def test_a_static_prefill_batch_refuses_what_it_cannot_hold() -> None:
    """A chunk with past in a bucket without page tables, or reaching past the bucket's pages, is
    an error, not a silent wrong attention."""
    from infscaled.generation.kv import PagedBatch

    kv = StageKV(1024)
    kv.admit([1], [16], [64], [0])
    kv.length[1] = 16
    plain = PagedBatch.static_prefill(kv, 2, 16)
    with pytest.raises(ValueError, match="without a page table"):
        plain.load_prefill([1], [8], [16])
    narrow = PagedBatch.static_prefill(kv, 2, 16, pages=1)
    with pytest.raises(ValueError, match="chunks reaching 2 pages do not fit a static batch of 1"):
        narrow.load_prefill([1], [8], [16])


def test_failed_captures_start_a_fresh_pool_and_stop_after_three_with_none_succeeding(monkeypatch: Any,
                                                                                       caplog: Any) -> None:
    """generation/graphs.py `_Captures` (a step kind's graphs): each failed capture leaves its bucket
    eager and drops the memory pool (PyTorch's allocator fails an assertion on the next capture
    into a pool a capture failed in), so the next capture gets a fresh one; after three failures
    with none succeeding (a model no step of which can be captured: transformers' MoE layers on
    CUDA) later buckets run eagerly without trying, and one warning says so. Once one capture
    succeeded, failures never stop later tries. CUDA calls are replaced (CPU)."""
    import logging

    from infscaled.generation import graphs

    pools = iter(range(100))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: next(pools))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: "capture stream")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: "compute stream")
    tried: list[Any] = []
    succeed: set[int] = set()

    def fake_capture(forward: Any, compute: Any, stream: Any, pool: Any) -> tuple[Any, Any]:
        tried.append(pool)
        if len(tried) in succeed:
            return "graph", {"hidden": torch.zeros(1)}
        raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture")

    monkeypatch.setattr(graphs, "capture", fake_capture)
    captures = graphs._Captures(torch.device("cpu"))
    buckets = [graphs._Bucket(batch=None) for _ in range(5)]  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="infscaled.generation.graphs"):
        for i, b in enumerate(buckets):
            captures.capture(b, lambda: None, f"decode step {i}")
    assert tried == [0, 1, 2]  # three tries, each in a fresh pool; none after
    assert all(b.eager and b.graph is None for b in buckets)
    assert captures.given_up and captures.failed == 3
    gave_up = [r.getMessage() for r in caplog.records if "without trying again" in r.getMessage()]
    assert gave_up == ["decode step 2: 3 CUDA graph captures failed and none succeeded: these steps run eagerly "
                       "from now on, without trying again"]

    tried.clear()
    succeed.add(1)  # the first capture works: later failures never stop the tries
    captures = graphs._Captures(torch.device("cpu"))
    buckets = [graphs._Bucket(batch=None) for _ in range(6)]  # type: ignore[arg-type]
    for i, b in enumerate(buckets):
        captures.capture(b, lambda: None, f"decode step {i}")
    assert len(tried) == 6 and buckets[0].graph == "graph" and not buckets[0].eager
    assert all(b.eager for b in buckets[1:]) and not captures.given_up
    assert tried[:3] == [3, 3, 4]  # the pool is kept after a success, dropped after each failure
