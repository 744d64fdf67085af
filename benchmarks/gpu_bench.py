"""infscaled against what users run instead, on the same model, inputs and GPUs, in one run.

    python -m benchmarks.gpu_bench --gpus 4 --out out/gpu            # on a GPU machine
    python -m benchmarks.gpu_bench --device cpu --tiny --out out/dry # code-path dry run, no GPU

Cases (every one processes micro-batches of --batch sequences x --seq tokens, random token ids,
prompt-processing forward returning next-token logits [batch, vocab] to the host):
  monolith      (a) the Hugging Face model on one GPU, one batch at a time
  dp            (b) one monolith replica per GPU, each its own process (the bound when it fits)
  accelerate    (c) HF accelerate `dispatch_model` with a layer-balanced device_map (naive MP)
  gpipe         (d) torch.distributed.pipelining, ScheduleGPipe, forward only, m=8 micro-batches
  infscaled     (e) infscaled pipelines: 1 stage (the whole model), 2 and 4 stages, and a replicated
                    bottleneck stage, with CUDA graphs (the default); the 2-stage case once more
                    without (eager launches). With one GPU only (a) and the 1-stage case run.
Each case also reports matrix TFLOP/s (`batch_flops`) and its share of --peak; a 1-stage case
also of its stage's GPU compute time per micro-batch (issue 14's prompt-processing target).
Model: builtin llama-3b-last (Llama architecture, hidden 3072, 28 layers, 32k vocab, ~3.0B
parameters, random weights, bf16); the lm_head runs on the last position only, in every case.

Stage split (infscaled and gpipe): each unit's (embed, 28 layers, head) forward time is measured
on one GPU first, and `planning.partition.balance` cuts the units by those times; the replicated
case picks the split minimising max_i(sum of stage i / replicas_i).

Efficiency of an infscaled case = measured / bound, bound = b * min_i(r_i / t_i), t_i the mean GPU
compute time per micro-batch of stage i as its workers report it (StageStats.compute_s, CUDA
events) in the same measurement window.

Writes results.json (every case, every number) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CTX = mp.get_context("spawn")


# -- common ---------------------------------------------------------------------------------------


class Opts:
    def __init__(self, a: argparse.Namespace) -> None:
        self.device = a.device  # "cuda" or "cpu"
        self.model = a.model
        self.batch = a.batch
        self.seq = a.seq
        self.seconds = a.seconds
        self.warmup = a.warmup
        self.dtype = a.dtype
        self.gpus = a.gpus
        self.peak = a.peak


def dev(o: Opts, i: int) -> str:
    return f"cuda:{i}" if o.device == "cuda" else "cpu"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def torch_dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def token_batches(o: Opts, vocab: int, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (o.batch, o.seq), generator=g) for _ in range(n)]


def summary(latencies: list[float], samples: int, elapsed: float) -> dict[str, Any]:
    lat = sorted(latencies)
    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3 if lat else float("nan")
    return {"seq_per_s": samples / elapsed if elapsed > 0 else 0.0, "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "batches": len(lat), "elapsed_s": elapsed}


def config(o: Opts) -> Any:
    from infscaled.models.builtins import builtin_config

    return builtin_config(o.model.removeprefix("builtin:"))


def batch_flops(o: Opts) -> float:
    """Matrix FLOPs of one micro-batch (--batch prompts of --seq tokens, no padding): 2 x the decoder
    layers' projection weights x tokens, the lm_head on each row's last token (the builtin's
    next-token head), and causal attention (QK^T and PV: 2 x T^2 x heads x head size per row and
    layer, half of the square each)."""
    cfg = config(o)
    d, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    per_layer = d * (heads + 2 * kv_heads) * head_dim + heads * head_dim * d + 3 * d * inter
    tokens = o.batch * o.seq
    return float(2 * layers * per_layer * tokens + 2 * d * cfg.vocab_size * o.batch
                 + 2 * layers * o.batch * o.seq * o.seq * heads * head_dim)


def with_flops(o: Opts, s: dict[str, Any]) -> dict[str, Any]:
    """Adds the achieved matrix TFLOP/s of the run and its share of --peak; for a one-stage
    pipeline (the whole model) also of the stage's GPU compute time per micro-batch."""
    flops = batch_flops(o)
    s["batch_tflop"] = flops / 1e12
    s["tflops"] = s["seq_per_s"] / o.batch * flops / 1e12
    s["of_peak"] = s["tflops"] / o.peak
    if len(s.get("stage_compute_ms") or ()) == 1:
        s["stage_tflops"] = flops / (s["stage_compute_ms"][0] * 1e-3) / 1e12
        s["stage_of_peak"] = s["stage_tflops"] / o.peak
    return s


def hf_model(o: Opts, device: str) -> Any:
    """The Hugging Face causal LM, random weights, built directly on `device` in the run dtype."""
    import transformers

    cfg = config(o)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype(o.dtype))
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def hf_forward(model: Any, ids: torch.Tensor) -> torch.Tensor:
    # No padding in these inputs: no attention mask (sdpa's causal fast path), last position only.
    return model(input_ids=ids, logits_to_keep=1).logits[:, -1]  # [B, V]


def timed_loop(step: Callable[[int], None], seconds: float, warmup: int) -> tuple[list[float], float, int]:
    """Run `step(i)` (which must end synchronised) `warmup` times, then for `seconds`."""
    for i in range(warmup):
        step(i)
    lat: list[float] = []
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        step(i)
        lat.append(time.perf_counter() - t)
        i += 1
    return lat, time.perf_counter() - start, i


# -- (a) monolith and (b) data parallel -----------------------------------------------------------


def run_monolith(o: Opts, device: str) -> dict[str, Any]:
    model = hf_model(o, device)
    batches = [b.to(device) for b in token_batches(o, config(o).vocab_size)]

    def step(i: int) -> None:
        with torch.inference_mode():
            hf_forward(model, batches[i % len(batches)]).cpu()  # result to the host: synchronises

    lat, elapsed, n = timed_loop(step, o.seconds, o.warmup)
    return with_flops(o, summary(lat, n * o.batch, elapsed))


def _dp_child(o: Opts, device: str, barrier: Any, out: Any) -> None:
    try:
        torch.cuda.set_device(device) if device.startswith("cuda") else None
        model = hf_model(o, device)
        batches = [b.to(device) for b in token_batches(o, config(o).vocab_size)]

        def step(i: int) -> None:
            with torch.inference_mode():
                hf_forward(model, batches[i % len(batches)]).cpu()

        for i in range(o.warmup):
            step(i)
        barrier.wait()
        lat, elapsed, n = timed_loop(step, o.seconds, 0)
        out.put(("ok", device, lat, n, elapsed))
    except BaseException as e:  # noqa: BLE001 - child boundary
        out.put(("error", device, traceback.format_exc(), 0, 0.0))
        raise SystemExit(1) from e


def run_dp(o: Opts, gpus: list[int]) -> dict[str, Any]:
    barrier, out = CTX.Barrier(len(gpus)), CTX.Queue()
    procs = [CTX.Process(target=_dp_child, args=(o, dev(o, g), barrier, out)) for g in gpus]
    for p in procs:
        p.start()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    errors = [r[2] for r in results if r[0] != "ok"]
    if errors:
        raise RuntimeError(errors[0])
    lat = [x for r in results for x in r[2]]
    total = sum(r[3] * o.batch / r[4] for r in results)
    s = summary(lat, 0, 1.0)
    s["seq_per_s"] = total
    s["per_replica_seq_per_s"] = [r[3] * o.batch / r[4] for r in results]
    return s


# -- (c) accelerate device_map --------------------------------------------------------------------


def run_accelerate(o: Opts, gpus: list[int], split: list[tuple[int, int]]) -> dict[str, Any]:
    from accelerate import dispatch_model

    model = hf_model(o, dev(o, gpus[0]))
    layers = config(o).num_hidden_layers
    # Units: 0 = embed, 1..L = layers, L+1 = head; the same split as the pipelines.
    device_map: dict[str, Any] = {}
    for s, (first, last) in enumerate(split):
        g = gpus[s]
        for u in range(first, last + 1):
            if u == 0:
                device_map["model.embed_tokens"] = g
                device_map["model.rotary_emb"] = g
            elif u <= layers:
                device_map[f"model.layers.{u - 1}"] = g
            else:
                device_map["model.norm"] = g
                device_map["lm_head"] = g
    model = dispatch_model(model, device_map=device_map)
    batches = [b.to(dev(o, gpus[0])) for b in token_batches(o, config(o).vocab_size)]

    def step(i: int) -> None:
        with torch.inference_mode():
            hf_forward(model, batches[i % len(batches)]).cpu()

    lat, elapsed, n = timed_loop(step, o.seconds, o.warmup)
    return with_flops(o, summary(lat, n * o.batch, elapsed))


# -- (d) torch.distributed.pipelining GPipe -------------------------------------------------------


class _GPipeStage(torch.nn.Module):
    """Units first..last of the HF model as one pipelining stage module (same split as infscaled)."""

    def __init__(self, model: Any, first: int, last: int, layers: int) -> None:
        super().__init__()
        base = model.model
        self.embed = base.embed_tokens if first == 0 else None
        self.layers = torch.nn.ModuleList(base.layers[u - 1] for u in range(max(first, 1), min(last, layers) + 1))
        self.head = last == layers + 1
        self.norm = base.norm if self.head else None
        self.lm_head = model.lm_head if self.head else None
        self.rotary = base.rotary_emb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.embed is not None else x  # [B, T, D]
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        cos_sin = self.rotary(h, pos)
        for layer in self.layers:
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=cos_sin, use_cache=False)
        if self.head:
            return self.lm_head(self.norm(h[:, -1]))  # [B, V]
        return h


def _gpipe_child(rank: int, o: Opts, gpus: list[int], split: list[tuple[int, int]], port: int,
                 m: int, out: Any) -> None:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    try:
        world = len(gpus)
        device = dev(o, gpus[rank])
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        # Build the whole model on meta, then only this stage's modules on the device.
        import transformers

        cfg = config(o)
        with torch.device("meta"):
            full = transformers.LlamaForCausalLM(cfg)
        first, last = split[rank]
        module = _GPipeStage(full, first, last, cfg.num_hidden_layers)
        rotary_cls = type(module.rotary)
        module.to_empty(device=device)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.ones_like(p) if p.ndim < 2 else torch.randn_like(p) * 0.02)
        module.to(torch_dtype(o.dtype)).eval()
        module.rotary = rotary_cls(cfg).to(device)  # its buffers were not materialised by to_empty
        stage = PipelineStage(module, rank, world, torch.device(device))
        sched = ScheduleGPipe(stage, n_microbatches=m)
        batches = [torch.cat([b] * m).to(device) for b in token_batches(o, cfg.vocab_size)]  # [m*B, T]

        def step(i: int) -> None:
            with torch.no_grad():
                if rank == 0:
                    sched.step(batches[i % len(batches)])
                else:
                    y = sched.step()
                    if rank == world - 1:
                        y.cpu()  # result to the host: synchronises

        for i in range(o.warmup):
            step(i)
        dist.barrier()
        # Every rank runs the same number of steps: rank 0 decides by time and broadcasts.
        steps = torch.zeros(1, dtype=torch.int64, device=device)
        if rank == 0:
            t0 = time.perf_counter()
            step(0)
            sync(device)
            per = time.perf_counter() - t0
            steps[0] = max(3, int(o.seconds / max(per, 1e-6)))
        else:
            step(0)
        dist.broadcast(steps, 0)
        n = int(steps.item())
        dist.barrier()
        lat: list[float] = []
        start = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            step(i)
            lat.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - start
        if rank == world - 1:
            out.put(("ok", lat, n * m * o.batch, elapsed))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - child boundary
        out.put(("error", traceback.format_exc(), 0, 0.0))
        raise SystemExit(1) from e


def run_gpipe(o: Opts, gpus: list[int], split: list[tuple[int, int]], m: int = 8) -> dict[str, Any]:
    out = CTX.Queue()
    port = free_port()
    procs = [CTX.Process(target=_gpipe_child, args=(r, o, gpus, split, port, m, out)) for r in range(len(gpus))]
    for p in procs:
        p.start()
    try:
        status, lat, samples, elapsed = out.get(timeout=600)
    finally:
        for p in procs:
            p.join(120)
            if p.is_alive():
                p.kill()
    if status != "ok":
        raise RuntimeError(lat)
    s = summary(lat, samples, elapsed)
    s["note"] = f"latency = one GPipe step of m={m} micro-batches ({m * o.batch} sequences)"
    return s


# -- (e) infscaled --------------------------------------------------------------------------------


def run_infscaled(o: Opts, name: str, split: list[tuple[int, int]], replicas: list[int], devices: list[str],
                  out_dir: Path, inflight: int, profile: bool = False, gloo: bool = False,
                  graphs: bool = True) -> dict[str, Any]:
    from infscaled.config import parse_job
    from infscaled.engine.profile import PROFILE_ENV
    from infscaled.runner.launcher import LocalJob, prepare
    from infscaled.worker.nccl import TRANSPORT_ENV

    # The workers inherit these: a Chrome trace of 10 micro-batches per CUDA stage; gloo-only edges.
    if profile:
        os.environ[PROFILE_ENV] = str(out_dir)
    if gloo:
        os.environ[TRANSPORT_ENV] = "gloo"
    try:
        return _run_infscaled(o, name, split, replicas, devices, out_dir, inflight, graphs, parse_job, LocalJob,
                              prepare)
    finally:
        os.environ.pop(PROFILE_ENV, None)
        os.environ.pop(TRANSPORT_ENV, None)


def _run_infscaled(o: Opts, name: str, split: list[tuple[int, int]], replicas: list[int], devices: list[str],
                   out_dir: Path, inflight: int, graphs: bool, parse_job: Any, LocalJob: Any,  # noqa: N803
                   prepare: Any) -> dict[str, Any]:

    data = {"name": name, "model": {"source": o.model, "dtype": o.dtype},
            "pipeline": {"layers": [list(r) for r in split], "replicas": replicas, "micro_batch_size": o.batch,
                         "max_inflight": inflight, "max_wait_ms": 0.0, "edge_timeout_s": 120.0,
                         "cuda_graphs": graphs},
            "placement": {"devices": devices},
            "workload": {"request_timeout_s": 300.0}}
    cfg = parse_job(data, str(out_dir / f"{name}.toml"), base_dir=out_dir)
    prepared = prepare(cfg)
    batches = token_batches(o, prepared.spec.vocab_size)
    with LocalJob(prepared, ready_timeout_s=600.0) as job:
        lat: list[float] = []
        done = threading.Semaphore(0)
        slots = threading.Semaphore(inflight)
        errors: list[BaseException] = []
        counting = [False]
        completed = [0]

        def submit(i: int) -> None:
            slots.acquire()
            t = time.perf_counter()
            fut: Future[torch.Tensor] = job.submit(batches[i % len(batches)])

            def finished(f: Future[torch.Tensor], t: float = t) -> None:
                if f.exception() is not None:
                    errors.append(f.exception())  # type: ignore[arg-type]
                elif counting[0]:
                    lat.append(time.perf_counter() - t)
                    completed[0] += 1
                slots.release()
                done.release()

            fut.add_done_callback(finished)

        i = 0
        for _ in range(o.warmup * 2 + inflight):
            submit(i)
            i += 1
        # Wait for the warm-up to drain out, then count completions over the window.
        for _ in range(i):
            done.acquire()
        if errors:
            raise RuntimeError(f"infscaled {name}: {errors[0]}")
        counting[0] = True
        start = time.perf_counter()
        sent = i
        while time.perf_counter() - start < o.seconds and not errors:
            submit(i)
            i += 1
        elapsed = time.perf_counter() - start
        counting[0] = False
        stats = {str(n): h.stats for n, h in job.group.handles.items()}
        for _ in range(i - sent):
            done.acquire()
        if errors:
            raise RuntimeError(f"infscaled {name}: {errors[0]}")
        job.stop()
    s = summary(lat, completed[0] * o.batch, elapsed)
    stage_t: list[float] = []
    for st in range(len(split)):
        ts = [stats[f"{st}.{r}"].compute_s for r in range(replicas[st]) if stats.get(f"{st}.{r}") is not None]
        stage_t.append(statistics.mean(ts) if ts else float("nan"))
    bound = o.batch * min(r / t for r, t in zip(replicas, stage_t, strict=True))
    s.update(split=split, replicas=replicas, devices=devices, stage_compute_ms=[t * 1e3 for t in stage_t],
             bound_seq_per_s=bound, efficiency=s["seq_per_s"] / bound,
             stage_stats={k: (v.__dict__ if v is not None else None) for k, v in stats.items()},
             cuda_graphs=graphs, graph_replays={k: v.graph_replays for k, v in stats.items() if v is not None},
             transport=os.environ.get("INFSCALED_TRANSPORT", "auto"))
    return with_flops(o, s)


# -- per-unit cost and splits ---------------------------------------------------------------------


def unit_costs(o: Opts, device: str, reps: int = 10) -> list[float]:
    """Each unit's forward time (ms, median of `reps`) on one device, with infscaled's own units."""
    from infscaled.models.sources import resolve
    from infscaled.models.stage import Stage, skeleton

    sk = skeleton(resolve(o.model))
    dtype = torch_dtype(o.dtype)
    costs: list[float] = []
    shared = {k: m.to(device) for k, m in sk.family.shared(sk.model).items()}
    ids = token_batches(o, sk.family.input_spec().vocab_size)[0]
    act: dict[str, torch.Tensor] = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode():
        for i, unit in enumerate(sk.units):
            unit.to_empty(device=device)
            with torch.no_grad():
                for pname, p in unit.named_parameters():
                    p.copy_(torch.zeros_like(p) if pname.endswith("bias") else
                            torch.ones_like(p) if p.ndim < 2 else torch.randn_like(p) * 0.02)
            unit.to(dtype)
            stage = Stage([unit], shared, i, i, [])
            nxt = stage(dict(act))  # warm-up
            times = []
            for _ in range(3):  # the median of 3 runs of `reps` back-to-back calls, one sync each
                sync(device)
                t = time.perf_counter()
                for _ in range(reps):
                    stage(dict(act))
                sync(device)
                times.append((time.perf_counter() - t) / reps)
            costs.append(statistics.median(times) * 1e3)
            act = nxt
            unit.to_empty(device="meta")  # free it again
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return costs


def balanced(costs: list[float], stages: int) -> list[tuple[int, int]]:
    from infscaled.planning.partition import balance

    return [tuple(r) for r in balance(costs, stages)]  # type: ignore[misc]


def replicated_split(costs: list[float], replicas: list[int]) -> list[tuple[int, int]]:
    """Two stages: the cut minimising max(stage cost / replicas)."""
    assert len(replicas) == 2
    n = len(costs)
    best = min(range(1, n), key=lambda k: max(sum(costs[:k]) / replicas[0], sum(costs[k:]) / replicas[1]))
    return [(0, best - 1), (best, n - 1)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- driver ---------------------------------------------------------------------------------------


def cases(o: Opts, costs: list[float], gpus: int, out: Path) -> Iterator[tuple[str, Callable[[], dict[str, Any]]]]:
    split2, split4 = balanced(costs, 2), balanced(costs, 4) if gpus >= 4 else None
    g2 = [0, 1]
    yield "a monolith 1 GPU", lambda: run_monolith(o, dev(o, 0))
    yield "e infscaled 1 stage", lambda: run_infscaled(o, "inf1", [(0, len(costs) - 1)], [1], [dev(o, 0)], out, 3)
    if gpus < 2:
        return
    yield "b dp 2 GPUs", lambda: run_dp(o, g2)
    yield "c accelerate 2 GPUs", lambda: run_accelerate(o, g2, split2)
    yield "d gpipe 2 GPUs m=8", lambda: run_gpipe(o, g2, split2)
    yield "e infscaled 2 stages", lambda: run_infscaled(o, "inf2", split2, [1, 1], [dev(o, 0), dev(o, 1)], out, 5)
    yield "e infscaled 2 stages, no CUDA graphs", lambda: run_infscaled(
        o, "inf2eager", split2, [1, 1], [dev(o, 0), dev(o, 1)], out, 5, graphs=False)
    if o.device == "cuda":
        yield "e infscaled 2 stages, gloo edges (host copies)", lambda: run_infscaled(
            o, "inf2gloo", split2, [1, 1], [dev(o, 0), dev(o, 1)], out, 5, gloo=True)
    if gpus >= 3:
        rsplit = replicated_split(costs, [1, 2])
        g3 = [0, 1, 2]
        yield "b dp 3 GPUs", lambda: run_dp(o, g3)
        yield "e infscaled 3 GPUs, stage 1 x2", lambda: run_infscaled(
            o, "inf3r", rsplit, [1, 2], [dev(o, 0), dev(o, 1), dev(o, 2)], out, 7)
    if split4 is not None:
        g4 = [0, 1, 2, 3]
        yield "b dp 4 GPUs", lambda: run_dp(o, g4)
        yield "c accelerate 4 GPUs", lambda: run_accelerate(o, g4, split4)
        yield "d gpipe 4 GPUs m=8", lambda: run_gpipe(o, g4, split4)
        yield "e infscaled 4 stages", lambda: run_infscaled(o, "inf4", split4, [1, 1, 1, 1],
                                                              [dev(o, i) for i in g4], out, 9)
    if o.device == "cuda":
        short = Opts.__new__(Opts)
        short.__dict__.update(o.__dict__, seconds=3.0)
        yield "trace infscaled 2 stages (profiled)", lambda: run_infscaled(
            short, "trace2", split2, [1, 1], [dev(o, 0), dev(o, 1)], out, 5, profile=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all)")
    p.add_argument("--out", default="out/gpu", help="output directory")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: dry run of the code paths")
    p.add_argument("--tiny", action="store_true", help="builtin llama-tiny-last, short sequences (dry runs)")
    p.add_argument("--model", default="builtin:llama-3b-last")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per case (after warm-up)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up batches per case")
    p.add_argument("--peak", type=float, default=790.0, help="bf16 matrix TFLOP/s of one card (H200: ~790)")
    p.add_argument("--only", default="", help="comma-separated case-name prefixes to run (e.g. 'a ,e ')")
    a = p.parse_args()
    if a.tiny:
        a.model, a.seq = "builtin:llama-tiny-last", 32
    if a.device == "cpu":
        a.dtype = "float32" if a.dtype == "bfloat16" and a.tiny else a.dtype
        a.gpus = a.gpus or 2
    else:
        a.gpus = a.gpus or torch.cuda.device_count()
    o = Opts(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"argv": sys.argv, "torch": torch.__version__, "model": o.model, "dtype": o.dtype,
                            "batch": o.batch, "seq": o.seq, "seconds": o.seconds, "gpus": o.gpus}
    if o.device == "cuda":
        info["cards"] = [torch.cuda.get_device_name(i) for i in range(o.gpus)]
    t0 = time.perf_counter()
    costs = unit_costs(o, dev(o, 0))
    info["unit_ms"] = costs
    info["split2"], info["split4"] = balanced(costs, 2), balanced(costs, 4) if o.gpus >= 4 else None
    info["split3r"] = replicated_split(costs, [1, 2]) if o.gpus >= 3 else None
    print(f"unit costs (ms): embed {costs[0]:.2f}, layers {statistics.mean(costs[1:-1]):.2f} avg, "
          f"head {costs[-1]:.2f}; split2 {info['split2']} split4 {info['split4']} split3r {info['split3r']}",
          flush=True)
    results: dict[str, Any] = {}
    only = [s for s in a.only.split(",") if s]
    for name, fn in cases(o, costs, o.gpus, out):
        if only and not any(name.startswith(s) for s in only):
            continue
        t = time.perf_counter()
        try:
            results[name] = fn()
        except Exception:  # noqa: BLE001 - one failing case must not lose the others
            results[name] = {"error": traceback.format_exc()}
            print(f"{name}: FAILED\n{results[name]['error']}", flush=True)
        if o.device == "cuda":
            import gc

            gc.collect()
            torch.cuda.empty_cache()
        r = results[name]
        if "error" not in r:
            extra = f" eff {r['efficiency']:.3f} (bound {r['bound_seq_per_s']:.1f}, stage ms " \
                    f"{[round(x, 2) for x in r['stage_compute_ms']]})" if "efficiency" in r else ""
            if "graph_replays" in r:
                extra += f" graph replays {r['graph_replays']}"
            if "tflops" in r:
                extra += f" {r['tflops']:.0f} TFLOP/s ({r['of_peak']:.0%} of peak)"
            if "stage_of_peak" in r:
                extra += f", stage compute {r['stage_tflops']:.0f} TFLOP/s ({r['stage_of_peak']:.0%})"
            print(f"{name}: {r['seq_per_s']:.1f} seq/s p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms"
                  f"{extra} [{time.perf_counter() - t:.0f} s]", flush=True)
        info["results"] = results
        info["elapsed_s"] = time.perf_counter() - t0
        (out / "results.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    print(markdown(info))


def markdown(info: dict[str, Any]) -> str:
    res = info.get("results", {})
    mono = res.get("a monolith 1 GPU", {}).get("seq_per_s")
    rows = ["| case | seq/s | p50 ms | p99 ms | vs (a) | efficiency (measured / bound) |", "|---|---|---|---|---|---|"]
    for name, r in res.items():
        if "error" in r:
            rows.append(f"| {name} | failed | | | | |")
            continue
        vs = f"{r['seq_per_s'] / mono:.2f}x" if mono else ""
        eff = f"{r['efficiency']:.3f} (bound {r['bound_seq_per_s']:.1f})" if "efficiency" in r else ""
        rows.append(f"| {name} | {r['seq_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {vs} | {eff} |")
    return "\n".join(rows)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
