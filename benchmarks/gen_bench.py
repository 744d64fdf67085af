"""Decode throughput: infscaled generation (2 stages on 2 GPUs) against Hugging Face `generate`.

    python -m benchmarks.gen_bench --out out/gen                        # on a 2-GPU machine
    python -m benchmarks.gen_bench --device cpu --tiny --out out/dry    # code-path dry run

Same model (builtin llama-3b: Llama architecture, ~3.0B parameters, random weights, bf16), same
prompts (--prompt random token ids each), greedy, exactly --new tokens per sequence (no stop id):
  hf_1gpu      (a) `model.generate` on one GPU, --batch sequences at once
  hf_dp        (b) the same on every GPU at once, one process per GPU (data parallel)
  infscaled    (c) 2 stages on 2 GPUs, 2 * --batch sequences in flight (micro-batches of
               --batch, one per stage), decode steps replayed from CUDA graphs; the same with
               graphs off (eager decode steps); and with graphs, only --batch sequences in total
For (c) the greedy tokens of generate's prompts are compared with generate's (agreement_with_hf).
Tokens/s = sequences x new tokens / wall time of the whole run (prefill included, as for
`generate`). Writes gen.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CTX = mp.get_context("spawn")


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=gen).tolist()


def hf_generate(source: str, device: str, dtype: str, batch: list[list[int]], new: int,
                reps: int) -> tuple[float, list[list[int]]]:
    """Seconds of the fastest of `reps` timed `generate` calls (after one warm-up), and the tokens."""
    from infscaled.models.sources import resolve
    from infscaled.models.stage import Monolith

    model = Monolith(resolve(source), device, dtype, 0).model
    ids = torch.tensor(batch, device=device)
    kw: dict[str, Any] = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
    best = float("inf")
    with torch.inference_mode():
        model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        for _ in range(reps):
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            out = model.generate(ids, **kw)
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - started)
            assert out.shape[1] == ids.shape[1] + new
    return best, out[:, ids.shape[1]:].tolist()


def _dp_worker(source: str, device: str, dtype: str, batch: list[list[int]], new: int, reps: int,
               start: Any, result: Any) -> None:
    torch.cuda.set_device(device) if device.startswith("cuda") else None
    from infscaled.models.sources import resolve
    from infscaled.models.stage import Monolith

    model = Monolith(resolve(source), device, dtype, 0).model
    ids = torch.tensor(batch, device=device)
    kw: dict[str, Any] = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
    times = []
    with torch.inference_mode():
        model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        for _ in range(reps):
            start.wait()  # every replica starts together
            began = time.perf_counter()
            model.generate(ids, **kw)
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            times.append((began, time.perf_counter()))
    result.put(times)


def hf_data_parallel(source: str, devices: list[str], dtype: str, batch: list[list[int]], new: int,
                     reps: int) -> float:
    """Wall seconds (best rep) of every device running `generate` on `batch` at once."""
    start = CTX.Barrier(len(devices))
    result = CTX.Queue()
    procs = [CTX.Process(target=_dp_worker, args=(source, d, dtype, batch, new, reps, start, result))
             for d in devices]
    for p in procs:
        p.start()
    runs = [result.get(timeout=900) for _ in procs]
    for p in procs:
        p.join(60)
    return min(max(r[i][1] for r in runs) - min(r[i][0] for r in runs) for i in range(reps))


def infscaled_generate(source: str, devices: list[str], dtype: str, work: list[list[int]], new: int,
                       batch: int, reps: int, graphs: bool = True) -> tuple[float, list[Any], list[list[int]]]:
    """Seconds (best rep) for the pipeline to generate `new` tokens for every prompt in `work`, the
    stages' stats, and the tokens of the last repetition."""
    from infscaled.config import parse_job
    from infscaled.generation.params import SamplingParams
    from infscaled.runner.launcher import LocalJob, prepare

    stages = len(devices)
    cfg = parse_job({
        "name": "gen-bench", "model": {"source": source, "dtype": dtype},
        "pipeline": {"stages": stages, "cuda_graphs": graphs}, "placement": {"devices": devices},
        "generation": {"kv_budget_tokens": 2 * len(work) * (len(work[0]) + new) + 64, "max_batch_sequences": batch,
                       "micro_batches_in_flight": max(1, len(work) // batch) if len(work) >= batch else stages},
        "workload": {"request_timeout_s": 900.0},
    })
    best = float("inf")
    stats: list[Any] = []
    tokens: list[list[int]] = []
    with LocalJob(prepare(cfg), ready_timeout_s=900) as job:
        for rep in range(reps + 1):  # the first is a warm-up
            left = threading.Semaphore(0)
            errors: list[str] = []
            tokens = [[] for _ in work]

            def consume(token: int, done: bool, error: str | None, out: list[int], left: Any = left,
                        errors: Any = errors) -> None:
                if error:
                    errors.append(error)
                else:
                    out.append(token)
                if done:
                    left.release()

            started = time.perf_counter()
            for p, got in zip(work, tokens, strict=True):
                job.generator.submit(p, SamplingParams(max_new_tokens=new if rep else 4, temperature=0.0),
                                     functools.partial(consume, out=got))
            for _ in work:
                left.acquire()
            elapsed = time.perf_counter() - started
            assert not errors, errors[:3]
            if rep:
                best = min(best, elapsed)
        stats = [h.stats for h in job.state.workers.values()]
    return best, stats, tokens


def agreement(got: list[list[int]], reference: list[list[int]]) -> dict[str, float]:
    """How far greedy tokens agree with `generate`'s for the same prompts (bf16 on different kernels
    may pick another token at a near-tie, after which a sequence goes its own way)."""
    prefixes = [next((i for i, (a, b) in enumerate(zip(g, r, strict=False)) if a != b), min(len(g), len(r)))
                for g, r in zip(got, reference, strict=False)]
    return {"sequences": len(prefixes), "identical": sum(g == r for g, r in zip(got, reference, strict=False)),
            "mean_common_prefix": sum(prefixes) / max(1, len(prefixes))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="builtin llama-tiny (a dry run of the code paths)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default="out/gen")
    a = ap.parse_args()
    source = "builtin:llama-tiny" if a.tiny else "builtin:llama-3b"
    dtype = "float32" if a.device == "cpu" else "bfloat16"
    devices = ["cpu", "cpu"] if a.device == "cpu" else ["cuda:0", "cuda:1"]
    vocab = 512 if a.tiny else 32000
    batch = prompts(a.batch, a.prompt, vocab)
    double = batch + prompts(a.batch, a.prompt, vocab, seed=1)  # the first half: generate's prompts
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    rows: list[dict[str, Any]] = []

    def record(case: str, seqs: int, seconds: float, **extra: Any) -> None:
        tps = seqs * a.new / seconds
        rows.append({"case": case, "sequences": seqs, "seconds": seconds, "tokens_per_s": tps, **extra})
        agree = extra.get("agreement_with_hf")
        note = f"  ({agree['identical']}/{agree['sequences']} identical to generate's)" if agree else ""
        print(f"{case:34s} {seqs:3d} seqs  {seconds:8.3f} s  {tps:9.1f} tok/s{note}", flush=True)

    seconds, hf_tokens = hf_generate(source, devices[0], dtype, batch, a.new, a.reps)
    record("hf_generate_1gpu", a.batch, seconds)
    record("hf_generate_dp_2gpu", 2 * a.batch, hf_data_parallel(source, devices, dtype, batch, a.new, a.reps))
    for graphs in (True, False):
        seconds, stats, tokens = infscaled_generate(source, devices, dtype, double, a.new, a.batch, a.reps, graphs)
        record("infscaled_2stage_2x_batch" + ("" if graphs else "_no_graphs"), 2 * a.batch, seconds,
               agreement_with_hf=agreement(tokens[:a.batch], hf_tokens),
               stages=[{"node": s.node, "compute_s": s.compute_s, "busy": s.busy, "graph_replays": s.graph_replays}
                       for s in stats if s is not None])
    seconds, _, _ = infscaled_generate(source, devices, dtype, batch, a.new, a.batch // 2, a.reps)
    record("infscaled_2stage_1x_batch", a.batch, seconds)
    base = {r["case"]: r["tokens_per_s"] for r in rows}
    summary = {"card": card, "model": source, "dtype": dtype, "batch": a.batch, "prompt": a.prompt, "new": a.new,
               "rows": rows,
               "ratios": {"infscaled_vs_hf_1gpu": base["infscaled_2stage_2x_batch"] / base["hf_generate_1gpu"],
                          "infscaled_vs_hf_dp": base["infscaled_2stage_2x_batch"] / base["hf_generate_dp_2gpu"]}}
    (out / "gen.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{card}: batch {a.batch}, prompt {a.prompt}, {a.new} new tokens, {dtype}")
    print("| case | sequences | s | tokens/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['sequences']} | {r['seconds']:.3f} | {r['tokens_per_s']:.1f} |")
    print(json.dumps(summary["ratios"]))


if __name__ == "__main__":
    main()
