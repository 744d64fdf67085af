"""Generation on CUDA stages: decode steps replayed from CUDA graphs give HF `generate`'s tokens.

Marked `gpu`: skipped without CUDA (CI is CPU only); run on the device (BENCHMARKS.md section 5).
float32 with TF32 off (what workers set for float32 jobs), so greedy tokens on the GPU equal the
CPU reference token for token. Sequences of different prompt and output lengths join while
others run, so the decode batches change size (graph buckets of 1, 2 and 4 rows) and graphs are
captured and replayed for some buckets while others still run eagerly. Two-stage cases put
their stages on cuda:0 and cuda:1 where two GPUs exist, so the activations go over an NCCL edge
(engine/cuda.py's stream contract); on one GPU the same contract runs over TCP.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from test_generation_differential import LLAMA_LIKE
from test_generation_pipeline import hf_greedy, run_staggered

from infscaled.config import parse_job
from infscaled.models.sources import resolve
from infscaled.models.stage import Monolith
from infscaled.protocol.plan import Node
from infscaled.runner.launcher import LocalJob, prepare

pytestmark = pytest.mark.gpu
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def _work() -> list[tuple[list[int], int]]:
    gen = torch.Generator().manual_seed(11)
    lengths = [(5, 30), (12, 24), (3, 40), (8, 12), (20, 33), (2, 27), (9, 18), (14, 36)]
    return [(torch.randint(0, 512, (p,), generator=gen).tolist(), n) for p, n in lengths]


@pytest.mark.skipif(GPUS < 1, reason="needs CUDA")
@pytest.mark.parametrize(("stages", "graphs", "compiled", "chunk"),
                         [(2, True, False, 512), (2, False, False, 512), (2, True, True, 512), (1, True, False, 512),
                          (1, True, False, 4), (2, True, False, 5)])
def test_greedy_generation_on_cuda_stages_equals_hf_generate(stages: int, graphs: bool, compiled: bool,
                                                             chunk: int) -> None:
    """Decode attention is the CUDA default on the paged pools; `compiled`: the job option
    pipeline.compile (torch.compile'd decoder layers under the CUDA graphs). One stage: two
    micro-batches in flight, the second launched while the first one's tokens come back.
    `chunk`: prefill_chunk_tokens (4, 5: the prompts go in chunks that attend to their past)."""
    devices = ["cuda:0", "cuda:1" if GPUS > 1 else "cuda:0"][:stages]
    cfg = parse_job({"name": "gen-gpu", "model": {"source": "builtin:llama-tiny"},
                     "pipeline": {"stages": stages, "cuda_graphs": graphs, "compile": compiled},
                     "placement": {"devices": devices},
                     "generation": {"max_batch_sequences": 4, "prefill_chunk_tokens": chunk}})
    work = _work()
    mono = Monolith(resolve(cfg.model.source), "cpu", "float32", 0)
    expected = [hf_greedy(mono, p, n) for p, n in work]
    with LocalJob(prepare(cfg)) as job:
        results = run_staggered(job.generator, work)
        assert [r.error for r in results] == [None] * len(work)
        got = [r.tokens for r in results]
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            if g != e:
                first = next(j for j, (a, b) in enumerate(zip(g, e, strict=False)) if a != b)
                print(f"sequence {i}: first difference at token {first}: {g[first]} != {e[first]}")
        assert got == expected
        # Stats arrive every second: wait for the report that covers the whole run.
        deadline = time.monotonic() + 15
        while True:
            stats = [job.group.handles[Node(s, 0)].stats for s in range(stages)]
            replays = [s.graph_replays if s is not None else -1 for s in stats]
            if not graphs or all(r > 20 for r in replays) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        print(f"graphs {graphs}: decode steps replayed from CUDA graphs per stage: {replays}")
        if graphs:
            assert all(r > 20 for r in replays), replays
        else:
            assert replays == [0] * stages


def one_by_one_then_together(job: Any, work: list[tuple[list[int], int]], singles: int) -> list[list[int]]:
    """Greedy tokens of `work` (prompt, new tokens) through a running job: the first `singles`
    one after another (each waited for), then the rest at once; in `work`'s order."""
    from test_generation_pipeline import Collected

    from infscaled.generation.params import SamplingParams

    got: list[list[int]] = []
    for prompt, new in work[:singles]:
        c = Collected()
        job.generator.submit(prompt, SamplingParams(max_new_tokens=new, temperature=0.0), c)
        assert c.done.wait(60) and c.error is None
        got.append(c.tokens)
    collected = [Collected() for _ in work[singles:]]
    for (prompt, new), c in zip(work[singles:], collected, strict=True):
        job.generator.submit(prompt, SamplingParams(max_new_tokens=new, temperature=0.0), c)
    for c in collected:
        assert c.done.wait(60) and c.error is None
        got.append(c.tokens)
    return got


@pytest.mark.skipif(GPUS < 1, reason="needs CUDA")
@pytest.mark.parametrize("stages", [1, 2])
def test_prefills_replayed_from_graphs_give_hf_generate_tokens(stages: int) -> None:
    """Prompts of 3 to 16 tokens one after the other: each prefill is a 1 x 16 bucket
    (generation/graphs.py PrefillStep), captured on its second use and replayed from the third;
    then three at once (merged, or a 2 x 16 and a 1 x 16 bucket). Greedy tokens equal HF `generate` (float32)."""
    devices = ["cuda:0", "cuda:1" if GPUS > 1 else "cuda:0"][:stages]
    cfg = parse_job({"name": "gen-gpu-prefill", "model": {"source": "builtin:llama-tiny"},
                     "pipeline": {"stages": stages}, "placement": {"devices": devices},
                     "generation": {"max_batch_sequences": 4, "warmup_s": 0}})
    assert_one_by_one_then_together_equal_hf(cfg, 12, (3, 16, 9, 12, 5, 14, 7, 11), 6)


@pytest.mark.skipif(GPUS < 1, reason="needs CUDA")
def test_later_chunks_replayed_from_graphs_give_hf_generate_tokens() -> None:
    """Prompts of 40 and 33 tokens in chunks of 16: the chunks after the first have past, each
    in a (rows, columns, pages) bucket (generation/graphs.py PrefillStep), captured on its second
    use and replayed from the third, with the page tables, positions and past mask refilled for
    each; then three prompts at once. Greedy tokens equal HF `generate` (float32)."""
    cfg = parse_job({"name": "gen-gpu-chunks", "model": {"source": "builtin:llama-tiny"},
                     "pipeline": {"stages": 1}, "placement": {"devices": ["cuda:0"]},
                     "generation": {"max_batch_sequences": 4, "warmup_s": 0, "prefill_chunk_tokens": 16}})
    assert_one_by_one_then_together_equal_hf(cfg, 13, (40, 40, 40, 33, 33, 40, 33, 21), 5)


def assert_one_by_one_then_together_equal_hf(cfg: Any, seed: int, prompt_lengths: tuple[int, ...], new: int) -> None:
    """Random prompts of `prompt_lengths` (generator seeded `seed`), `new` tokens each, served by a
    job of `cfg` as `one_by_one_then_together` submits them (the first five alone, then the
    rest at once): greedy tokens equal HF `generate` on the CPU monolith (float32)."""
    gen = torch.Generator().manual_seed(seed)
    work = [(torch.randint(0, 512, (n,), generator=gen).tolist(), new) for n in prompt_lengths]
    mono = Monolith(resolve(cfg.model.source), "cpu", "float32", 0)
    expected = [hf_greedy(mono, p, n) for p, n in work]
    with LocalJob(prepare(cfg)) as job:
        got = one_by_one_then_together(job, work, 5)
    assert got == expected


@pytest.mark.skipif(GPUS < 1, reason="needs CUDA")
@pytest.mark.parametrize("model_type", LLAMA_LIKE)
def test_llama_like_families_on_cuda_stages_with_graphs_equal_hf_generate(model_type: str, tmp_path: Path) -> None:
    """The Llama adapter's further model types (test_generation_differential's configs) on CUDA:
    their layers are transformers' own (never the fused step), decode steps replayed from CUDA
    graphs, prompts longer than the windows in chunks of 16; float32, so greedy tokens equal HF."""
    from test_generation_differential import _reference, _save_model, llama_like_configs
    from test_generation_differential import hf_greedy as hf_greedy_of

    config, cls_name = llama_like_configs()[model_type]
    _save_model(tmp_path, config, cls_name)
    devices = ["cuda:0", "cuda:1" if GPUS > 1 else "cuda:0"]
    cfg = parse_job({"name": f"gen-gpu-{model_type}", "model": {"source": str(tmp_path), "dtype": "float32"},
                     "pipeline": {"stages": 2}, "placement": {"devices": devices},
                     "generation": {"max_batch_sequences": 4, "prefill_chunk_tokens": 16}})
    work = _work()
    model = _reference(str(tmp_path))
    expected = [hf_greedy_of(model, p, n) for p, n in work]
    with LocalJob(prepare(cfg)) as job:
        results = run_staggered(job.generator, work)
    assert [r.error for r in results] == [None] * len(work)
    assert [r.tokens for r in results] == expected
