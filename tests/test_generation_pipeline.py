"""Generation through real worker processes over gloo: KV caches in the stages, the decode loop
inside each replica chain, continuous batching, KV-budget admission, cancellation.

Reference: Hugging Face `generate` (greedy) on the monolithic model, one sequence at a time.
Sequences of different prompt and output lengths are submitted while others run, so they join
and leave the chains' micro-batches at every step.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from infscaled.config import parse_job
from infscaled.dispatch.sequences import Sequences
from infscaled.generation.kv import StageKV
from infscaled.generation.params import SamplingParams
from infscaled.models.sources import resolve
from infscaled.models.stage import Monolith, materialize, skeleton
from infscaled.runner.launcher import LocalJob, prepare


def hf_greedy(mono: Monolith, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = mono.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


class Collected:
    """What one sequence's consumer received."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.error: str | None = None
        self.done = threading.Event()

    def __call__(self, token: int, done: bool, error: str | None) -> None:
        if error is not None:
            self.error = error
        else:
            self.tokens.append(token)
        if done:
            self.done.set()


def gen_job(model: str, stages: int, replicas: int, **generation: Any) -> Any:
    pipeline: dict[str, Any] = {"stages": stages, "replicas": [replicas] * stages}
    if replicas > 1 and stages > 1:
        pipeline["graph"] = "parallel"
    return parse_job({"name": f"gen-{model}", "model": {"source": f"builtin:{model}"}, "pipeline": pipeline,
                      "generation": generation})


@pytest.fixture(scope="module")
def prompts() -> list[tuple[list[int], int]]:
    gen = torch.Generator().manual_seed(7)
    lengths = [(5, 6), (12, 3), (3, 9), (8, 1), (20, 5), (2, 7), (9, 4), (14, 8)]
    return [(torch.randint(0, 512, (p,), generator=gen).tolist(), n) for p, n in lengths]


def run_staggered(gen: Sequences, work: list[tuple[list[int], int]]) -> list[Collected]:
    """Submit half, wait for some tokens, submit the rest while the first ones still run."""
    results = [Collected() for _ in work]
    half = len(work) // 2
    for (prompt, new), got in zip(work[:half], results[:half], strict=True):
        gen.submit(prompt, SamplingParams(max_new_tokens=new, temperature=0.0), got)
    deadline = time.monotonic() + 60
    while sum(len(r.tokens) for r in results[:half]) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    for (prompt, new), got in zip(work[half:], results[half:], strict=True):
        gen.submit(prompt, SamplingParams(max_new_tokens=new, temperature=0.0), got)
    for r in results:
        assert r.done.wait(120), "a sequence never finished"
    return results


# 1 to 3 stages, one and two chains, three families: 11 worker processes (llama-tiny in 4 stages
# x 2 chains, 8 processes, tested nothing that 3 x 2 does not: a middle stage on each chain).
@pytest.mark.parametrize(("model", "stages", "replicas"), [
    ("gpt2-tiny", 1, 1), ("gpt2-tiny", 2, 2), ("qwen2-tiny", 2, 1), ("llama-tiny", 3, 2),
])
def test_greedy_generation_equals_hf_generate(model: str, stages: int, replicas: int,
                                              prompts: list[tuple[list[int], int]]) -> None:
    cfg = gen_job(model, stages, replicas, max_batch_sequences=3)
    mono = Monolith(resolve(cfg.model.source), "cpu", "float32", 0)
    expected = [hf_greedy(mono, p, n) for p, n in prompts]
    with LocalJob(prepare(cfg)) as job:
        results = run_staggered(job.generator, prompts)
        assert [r.error for r in results] == [None] * len(prompts)
        assert [r.tokens for r in results] == expected
        assert job.generator.live() == 0 and job.generator.finished == len(prompts)


def test_more_sequences_than_the_kv_budget_queue_and_all_finish(prompts: list[tuple[list[int], int]]) -> None:
    # Room for about two sequences at a time per stage: the others wait for their turn.
    cfg = gen_job("gpt2-tiny", 2, 1, kv_budget_tokens=30, max_batch_sequences=4)
    mono = Monolith(resolve(cfg.model.source), "cpu", "float32", 0)
    work = [(p, n) for p, n in prompts if len(p) + n <= 30]
    with LocalJob(prepare(cfg)) as job:
        results = run_staggered(job.generator, work)
        assert [r.tokens for r in results] == [hf_greedy(mono, p, n) for p, n in work]
        with pytest.raises(Exception, match="needs 31 KV positions; each stage of this job holds at most 30"):
            job.generator.submit([1] * 21, SamplingParams(max_new_tokens=10), Collected())


def test_cancel_frees_the_caches_on_every_stage() -> None:
    """A cancelled sequence (its client went away) leaves no cache behind, as every stage reports.
    The last stage is stopped while the sequence is cancelled (the heartbeat timeout is long), so
    the sequence cannot finish first: its 220 tokens take well under the 1 s stats interval."""
    import os
    import signal

    from infscaled.protocol.plan import Node

    cfg = parse_job({"name": "gen-llama-tiny", "model": {"source": "builtin:llama-tiny"}, "pipeline": {"stages": 3},
                     "generation": {"kv_budget_tokens": 4096}, "recovery": {"heartbeat_timeout_s": 60}})
    with LocalJob(prepare(cfg)) as job:
        handles = job.group.handles

        def kv_report() -> list[tuple[int, int, int]]:
            return [(h.stats.kv_sequences, h.stats.kv_tokens, h.stats.kv_reserved_tokens) if h.stats else (-1, -1, -1)
                    for h in handles.values()]

        long = Collected()
        seq = job.generator.submit(list(range(1, 30)), SamplingParams(max_new_tokens=220, temperature=0.0), long)
        wait_for(lambda: len(long.tokens) >= 5, "the first tokens")
        last = handles[Node(2, 0)].process.pid
        assert last is not None
        os.kill(last, signal.SIGSTOP)  # the chain stalls with the sequence alive
        try:
            wait_for(lambda: all(n == 1 and t >= 29 and r == 29 + 220 for n, t, r in kv_report()[:2]),
                     "the cache in use")
            middle = handles[Node(1, 0)].stats
            assert middle is not None and [(e.src, e.samples_per_s > 0) for e in middle.inputs] == [("0.0", True)]
            job.generator.cancel(seq)
        finally:
            os.kill(last, signal.SIGCONT)
        wait_for(lambda: kv_report() == [(0, 0, 0)] * 3, "every stage to free the cancelled sequence")
        assert not long.done.is_set() and 5 <= len(long.tokens) < 220
        short = Collected()
        job.generator.submit([3, 4, 5], SamplingParams(max_new_tokens=4, temperature=0.0), short)
        assert short.done.wait(60) and len(short.tokens) == 4 and short.error is None
        assert job.generator.live() == 0


def wait_for(check: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("fused", [False, True])
def test_single_process_kv_decode_matches_hf_for_every_decoder_family(fused: bool) -> None:
    """The stage-level KV path without processes: prefill in one batch, decode in changing groups.
    `fused`: decode steps through the fused projections (models/families/fused_decode.py), whose
    weights the layers then read as views (no second copy)."""
    from infscaled.models.stage import fuse_stage

    # (fused: the families with fused decode steps: Qwen2 adds q/k/v biases, Mistral a window)
    for name in ("llama-tiny", "qwen2-tiny", "mistral-tiny") if fused else ("gpt2-tiny", "llama-tiny", "qwen2-tiny",
                                                                            "mistral-tiny"):
        resolved = resolve("builtin:" + name)
        mono = Monolith(resolved, "cpu", "float32", 0)
        n = skeleton(resolved).unit_count
        stages = [materialize(skeleton(resolved), a, b, "cpu", "float32", 0, None)
                  for a, b in ((0, 1), (2, n - 2), (n - 1, n - 1))]
        if fused:
            params = [sum(p.numel() for p in s.parameters()) for s in stages]
            assert sum(fuse_stage(s) for s in stages) == n - 2  # every decoder layer
            assert [sum(p.numel() for p in s.parameters()) for s in stages] == params
            block = stages[0].units[1]
            attn = block.layer.self_attn
            rows_q = attn.q_proj.weight.shape[0]
            assert attn.k_proj.weight.data_ptr() == block.__dict__["_fused"].qkv[rows_q:].data_ptr()
        kvs = [StageKV(1000) for _ in stages]
        gen = torch.Generator().manual_seed(3)
        prompts = [torch.randint(0, 512, (length,), generator=gen).tolist() for length in (5, 9, 3)]
        new = [6, 4, 8]
        got = decode_in_process(stages, kvs, prompts, new)
        assert got == [hf_greedy(mono, p, m) for p, m in zip(prompts, new, strict=True)], name
        assert all(kv.held_tokens == sum(len(p) + m - 1 for p, m in zip(prompts, new, strict=True)) for kv in kvs)


def prefill_in_process(stages: list[Any], kvs: list[StageKV], prompts: list[list[int]],
                       reserves: list[int]) -> dict[str, torch.Tensor]:
    """Sequences 0..n-1 (the prompts, right-padded into one micro-batch) through the stages, each
    caching them; the last stage's output."""
    seqs = list(range(len(prompts)))
    lengths = [len(p) for p in prompts]
    ids = torch.zeros(len(prompts), max(lengths), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p), 1
    act: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
    for stage, kv in zip(stages, kvs, strict=True):
        batch = kv.prefill(seqs, lengths, reserves)
        act = stage(act, batch)
        kv.store(seqs, batch)
    return act


def chunked_prefill_in_process(stages: list[Any], kvs: list[StageKV], prompts: list[list[int]],
                               reserves: list[int], chunk: int) -> list[int]:
    """Sequences 0..n-1 prefilled in chunks of `chunk` tokens, as stage 0 schedules them: each
    micro-batch takes the next chunk of every started prompt, and prompt i starts at round i, so
    rows with past and fresh rows share micro-batches. Each sequence's first token (greedy)."""
    done = [0] * len(prompts)
    first: dict[int, int] = {}
    round_ = 0
    while len(first) < len(prompts):
        rows = [s for s in range(min(round_ + 1, len(prompts))) if done[s] < len(prompts[s])]
        round_ += 1
        parts = [prompts[s][done[s]:done[s] + chunk] for s in rows]
        ids = torch.zeros(len(rows), max(len(p) for p in parts), dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(parts):
            ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p), 1
        starts = [done[s] for s in rows]
        act: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask,
                                        "position_ids": torch.tensor(starts).unsqueeze(1) + torch.arange(ids.shape[1])}
        for stage, kv in zip(stages, kvs, strict=True):
            batch = kv.prefill(rows, [len(p) for p in parts], [reserves[s] for s in rows], starts)
            batch.last_logits = True
            act = stage(act, batch)
            kv.store(rows, batch)
        for i, s in enumerate(rows):
            done[s] += len(parts[i])
            if done[s] == len(prompts[s]):
                first[s] = int(act["output"][i].argmax())
    return [first[s] for s in range(len(prompts))]


def decode_in_process(stages: list[Any], kvs: list[StageKV], prompts: list[list[int]],
                      new: list[int], chunk: int = 0) -> list[list[int]]:
    seqs = list(range(len(prompts)))
    lengths = [len(p) for p in prompts]
    reserves = [n + m for n, m in zip(lengths, new, strict=True)]
    with torch.inference_mode():
        if chunk:
            out = [[t] for t in chunked_prefill_in_process(stages, kvs, prompts, reserves, chunk)]
        else:
            act = prefill_in_process(stages, kvs, prompts, reserves)
            out = [[int(act["output"][i, lengths[i] - 1].argmax())] for i in seqs]
        step = 0
        while live := [s for s in seqs if len(out[s]) < new[s]]:
            groups = [live] if step % 2 == 0 else [[s] for s in live]  # batches change every step
            step += 1
            for group in groups:
                act = {"input_ids": torch.tensor([[out[s][-1]] for s in group]),
                       "attention_mask": torch.ones(len(group), 1, dtype=torch.int64),
                       "position_ids": torch.tensor([[lengths[s] + len(out[s]) - 1] for s in group])}
                for stage, kv in zip(stages, kvs, strict=True):
                    batch = kv.decode(group)
                    act = stage(act, batch)
                    kv.store(group, batch)
                for i, s in enumerate(group):
                    out[s].append(int(act["output"][i, -1].argmax()))
    return out


@pytest.mark.parametrize("fused", [False, True])
def test_chunked_prefill_matches_hf_for_every_decoder_family(fused: bool) -> None:
    """Prompts prefilled in chunks of 4 tokens (each chunk attends to the earlier ones in the
    pages), fresh rows and later chunks in the same micro-batches, then decoded: greedy = HF
    `generate` for every family, including windows of 4 (Mistral: every layer; Qwen2: layers 1-2),
    which chunks of past straddle. `fused`: the fused prefill step (models/families/fused_decode.py)."""
    from infscaled.models.sources import ResolvedModel, family_for_config
    from infscaled.models.stage import fuse_stage
    from tests.test_models_decoders import _sliding_configs

    models = [resolve("builtin:llama-tiny"), *(ResolvedModel(f"sliding-{k}", family_for_config(c), None)
                                               for k, c in _sliding_configs().items())]
    if not fused:
        models.insert(0, resolve("builtin:gpt2-tiny"))
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 512, (length,), generator=gen).tolist() for length in (13, 9, 5, 1)]
    new = [5, 6, 4, 3]
    for resolved in models:
        mono = Monolith(resolved, "cpu", "float32", 0)
        n = skeleton(resolved).unit_count
        stages = [materialize(skeleton(resolved), a, b, "cpu", "float32", 0, None) for a, b in ((0, 1), (2, n - 1))]
        if fused:
            assert sum(fuse_stage(s) for s in stages) == n - 2
        kvs = [StageKV(1000) for _ in stages]
        got = decode_in_process(stages, kvs, prompts, new, chunk=4)
        assert got == [hf_greedy(mono, p, m) for p, m in zip(prompts, new, strict=True)], resolved.source


def test_a_chunk_must_continue_its_sequence_exactly() -> None:
    kv = StageKV(256)
    kv.store([1], kv.prefill([1], [4], [20]))
    with pytest.raises(ValueError, match="a chunk from position 6, but 4 positions are cached"):
        kv.prefill([1], [3], [20], [6])
    with pytest.raises(ValueError, match="a chunk from position 2, but 0 positions are cached"):
        kv.prefill([2], [3], [20], [2])
    with pytest.raises(ValueError, match="prompt of 21 tokens exceeds its reservation of 20"):
        kv.prefill([1], [17], [20], [4])
    batch = kv.prefill([1], [3], [20], [4])
    kv.store([1], batch)
    assert kv.length[1] == 7 and kv.reserved[1] == 20 and len(kv.pages[1]) == 2


def test_infscaled_run_drives_a_generation_workload(tmp_path: Any) -> None:
    from infscaled.runner.run import render_summary, run_job

    cfg = parse_job({"name": "g", "model": {"source": "builtin:gpt2-tiny"}, "pipeline": {"stages": 2},
                     "generation": {"prompt_tokens": [2, 12], "output_tokens": [3, 9], "max_batch_sequences": 4},
                     "workload": {"requests": 10, "seed": 4}})
    summary = run_job(cfg, verify=True)
    doc = summary.to_json()
    assert (doc["completed"], doc["failed"], doc["verify"]) == (10, 0, {"checked": 10, "mismatched": 0})
    assert doc["output_tokens"] == sum(len(o.tokens) for o in summary.outcomes) > 10 and doc["tokens_per_s"] > 0
    q = doc["latency_ms"]
    assert 0 < q["ttft_p50"] <= q["ttft_p99"] and 0 < q["tpot_p50"] <= q["tpot_p99"]
    assert doc["recovery"] == {"replayed": 0, "duplicates_dropped": 0}  # the dispatcher's counters: no fault
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(render_summary(summary))
    assert "continued on another chain / late tokens dropped" in console.export_text()


def test_paged_kv_writes_gathers_masks_and_frees_pages() -> None:
    from infscaled.generation.kv import PAGE_TOKENS, PagedBatch

    kv = StageKV(100)  # 7 pages of 16 tokens + the scratch page
    assert (kv.page_count, kv.scratch_page) == (7, 7)
    written: dict[int, list[torch.Tensor]] = {}  # sequence -> its keys of layer 3, position by position

    def step(seqs: list[int], lengths: list[int] | None = None, batch: Any = None) -> Any:
        if batch is None:
            batch = kv.prefill(seqs, lengths, [20] * len(seqs)) if lengths else kv.decode(seqs)
        else:
            batch.load(seqs)
        t = 1 if batch.decoding else max(lengths or [1])
        rows = batch.positions.shape[0] if batch.decoding else len(seqs)
        out = {}
        for layer in (3, 4):  # what two attention layers would do: new keys / values [B, H, t, Dh]
            key = torch.randn(rows, 2, t, 4)
            out[layer] = batch.update(key, key * 2, layer)
            if batch.decoding:  # update returned the pools: each row's pages, as the torch backend reads them
                out[layer] = tuple(gathered(pool, batch.table) for pool in out[layer])
            if layer == 3:
                for i, s in enumerate(seqs):
                    n = 1 if batch.decoding else lengths[i]
                    written.setdefault(s, []).extend(key[i, :, j] for j in range(n))
        kv.store(seqs, batch)
        return batch, out

    step([1, 2, 3], [4, 6, 2])
    assert kv.pages == {1: [0, 1], 2: [2, 3], 3: [4, 5]} and kv.held_tokens == 12
    batch, out = step([1, 2, 3])
    keys, values = out[3]  # [B, H, P * PAGE, Dh]: each row's own positions, the new one included
    assert keys.shape == (3, 2, 2 * PAGE_TOKENS, 4) and torch.equal(values, keys * 2)
    for i, s in enumerate([1, 2, 3]):
        n = len(written[s])
        assert torch.equal(keys[i, :, :n], torch.stack(written[s], dim=1)), s
    assert batch.positions.tolist() == [4, 6, 2]  # where each row's new token went
    kv.free([2])  # its pages go back and are handed out again first
    assert kv.held_tokens == 5 + 3 and kv.reserved_tokens == 40 and sorted(kv.seqs) == [1, 3]
    assert not kv.fits(60) and kv.fits(60 - 20) and not kv.fits_all([20, 20, 20])
    step([9], [3])
    assert kv.pages[9] == [2, 3]
    # A static batch of 4 rows x 4 pages (a CUDA graph's): padding rows point at the scratch page.
    static = PagedBatch.static(kv, 4, 4)
    static_batch, out = step([3, 1], batch=static)
    assert static_batch is static and static.table[2:].eq(kv.scratch_page).all() and static.table[0, 2:].eq(7).all()
    keys, _ = out[3]
    for i, s in enumerate([3, 1]):
        assert torch.equal(keys[i, :, :len(written[s])], torch.stack(written[s], dim=1)), s
    assert kv.length == {1: 6, 3: 4, 9: 3}
    with pytest.raises(MemoryError, match="KV budget exceeded: 1 of 7 pages free, 6 more asked"):
        kv.prefill([7, 8], [3, 3], [40, 40])
    with pytest.raises(ValueError, match="3 sequences do not fit a decode batch of 2 x 4 pages"):
        PagedBatch.static(kv, 2, 4).load([1, 3, 9])


def gathered(pool: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """A pool [pages + 1, PAGE, H, Dh] read through a page table [B, P] -> [B, H, P * PAGE, Dh]."""
    b, p = table.shape
    return pool[table].reshape(b, p * pool.shape[1], *pool.shape[2:]).transpose(1, 2)


def test_a_timed_out_sequence_is_failed_and_its_caches_freed() -> None:
    import os
    import signal

    from infscaled.protocol.plan import Node

    cfg = parse_job({"name": "t", "model": {"source": "builtin:llama-tiny"}, "pipeline": {"stages": 2},
                     "generation": {}, "workload": {"request_timeout_s": 1.0}})
    with LocalJob(prepare(cfg)) as job:
        slow = Collected()
        job.generator.submit([1, 2, 3], SamplingParams(max_new_tokens=240, temperature=0.0), slow)
        wait_for(lambda: len(slow.tokens) >= 3, "the first tokens")
        last = job.group.handles[Node(1, 0)].process.pid
        assert last is not None
        os.kill(last, signal.SIGSTOP)  # the chain stalls: the sequence cannot finish in time
        try:
            assert slow.done.wait(30)
        finally:
            os.kill(last, signal.SIGCONT)
        assert slow.error == "timed out after 1 s" and len(slow.tokens) < 240
        handles = job.group.handles.values()
        wait_for(lambda: all(h.stats is not None and (h.stats.kv_sequences, h.stats.kv_reserved_tokens) == (0, 0)
                             for h in handles), "the stages to free the timed-out sequence")
        assert job.generator.live() == 0


def test_seeded_sampling_through_the_pipeline_equals_the_single_process_reference() -> None:
    """Temperature / top_k / top_p with a seed: the same tokens as ReferenceBackend (the model's own
    forward in one process), whatever else shares the micro-batches."""
    import asyncio

    from infscaled.generation.reference import ReferenceBackend

    cfg = gen_job("gpt2-tiny", 2, 1, max_batch_sequences=4)
    params = [SamplingParams(max_new_tokens=12, temperature=0.8, top_k=50, top_p=0.9, seed=s) for s in (1, 2, 3)]
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    reference = ReferenceBackend.from_source(cfg.model.source)

    async def expected() -> list[list[int]]:
        return [[t async for t in reference.generate(p, sp)] for p, sp in zip(prompts, params, strict=True)]

    want = asyncio.run(expected())
    with LocalJob(prepare(cfg)) as job:
        got = [Collected() for _ in prompts]
        for p, sp, c in zip(prompts, params, got, strict=True):
            job.generator.submit(p, sp, c)
        again = Collected()  # the first sequence once more, now alone
        for c in got:
            assert c.done.wait(60) and c.error is None
        job.generator.submit(prompts[0], params[0], again)
        assert again.done.wait(60)
    assert [c.tokens for c in got] == want
    assert again.tokens == want[0]


def test_a_one_stage_chain_running_ahead_ends_sequences_exactly() -> None:
    """One stage launches step N + 1 before the host has step N's tokens (generation.py
    `_run_ahead`): sequences that end by a stop token get no token past it, those that end by
    length no more than they asked for, rows with penalties (sampled on the host) keep their tokens
    in order next to rows that run ahead, and every cache is freed at the end."""
    import asyncio

    from infscaled.generation.reference import ReferenceBackend

    cfg = gen_job("llama-tiny", 1, 1, max_batch_sequences=4)
    reference = ReferenceBackend.from_source(cfg.model.source)
    prompt = [5, 6, 7, 8, 9]
    free_run = SamplingParams(max_new_tokens=12, temperature=0.0)

    async def reference_tokens(prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
        return [[t async for t in reference.generate(p, sp)] for p, sp in zip(prompts, params, strict=True)]

    [unstopped] = asyncio.run(reference_tokens([prompt], [free_run]))
    stop = unstopped[3]  # the sequence's 4th token: it ends there, mid-way through its micro-batches
    params = [SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=(stop,)),
              SamplingParams(max_new_tokens=9, temperature=0.0),
              SamplingParams(max_new_tokens=10, temperature=0.0, repetition_penalty=1.5),
              SamplingParams(max_new_tokens=1, temperature=0.0),
              SamplingParams(max_new_tokens=7, temperature=0.9, top_k=20, seed=3)]
    prompts = [prompt, [11, 12, 13], [21, 22, 23, 24], [31, 32], [41, 42, 43]]
    want = asyncio.run(reference_tokens(prompts, params))
    assert want[0] == unstopped[:unstopped.index(stop) + 1]
    with LocalJob(prepare(cfg)) as job:
        for _ in range(2):  # all at once, then again with the caches of the first round reused
            got = [Collected() for _ in prompts]
            for p, sp, c in zip(prompts, params, got, strict=True):
                job.generator.submit(p, sp, c)
            for c in got:
                assert c.done.wait(60) and c.error is None
            assert [c.tokens for c in got] == want
        [handle] = job.group.handles.values()
        wait_for(lambda: handle.stats is not None and (handle.stats.kv_sequences, handle.stats.kv_tokens,
                                                        handle.stats.kv_reserved_tokens) == (0, 0, 0),
                 "the stage to free every cache")
        assert job.generator.live() == 0


def test_a_workload_longer_than_the_context_is_refused_before_starting() -> None:
    from infscaled.errors import ConfigError
    from infscaled.runner.run import run_job

    cfg = parse_job({"name": "long", "model": {"source": "builtin:gpt2-tiny"}, "pipeline": {"stages": 2},
                     "generation": {"prompt_tokens": [8, 200], "output_tokens": [8, 100]}})
    with pytest.raises(ConfigError) as info:
        run_job(cfg)
    assert str(info.value) == (
        "<string>: generation.output_tokens = [8, 100]: the longest prompt (200 tokens) plus the longest output "
        "(100) needs 300 positions; allowed: lengths with prompt + output <= 256 (the context of builtin:gpt2-tiny)")
