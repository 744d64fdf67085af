"""The whole model's decode step against the memory-bandwidth bound (issue 14), per variant.

    python -m benchmarks.decode_step                        # on a GPU: llama-3b, batches 8 and 64
    python -m benchmarks.decode_step --tiny --device cpu    # code-path dry run (eager, torch attention)

The whole model is one stage (all units; what a 1-stage `infscaled run` runs; the issue's "both
halves" summed the same work). For each batch size: prefill --batch sequences of --prompt random
tokens, then run decode steps with each variant, every variant from its own copy of the same
cache state:

- attention "torch" (gather the pages + sdpa), "flex" (flex_attention on the pools in place) or
  "triton" (generation/triton_decode.py; "triton-nosplit": the same kernel without splitting
  few rows' positions across programs),
- layers eager, "compiled" (torch.compile, models/stage.py compile_stage) or "autotune"
  (the same with mode max-autotune-no-cudagraphs),
- optionally ":fused": decode steps through the fused projections (models/families/fused_decode.py,
  what generation stages run); without it, transformers' own layer,
- always replayed from CUDA graphs (generation/graphs.py) on CUDA.

Per variant: `step_ms`, the median wall time of one whole step as the engine calls it (host
preparation, input copy, replay, greedy tokens on the GPU and their asynchronous copy to
pinned host memory, waited for); `gpu_ms`, the GPU time of one
replay (CUDA events around --replays back-to-back replays of the step's graph); and the largest
relative difference of its logits from the first variant's. The bound is the bytes every step
must read (all parameters but the embedding table, of which a step reads B rows) over --bw.
`--profile` adds, for the fastest variant of each batch, the top kernels of a profiled replay.
`--forward` times prompt processing (--forward-batch x --forward-len tokens, no cache) eager and
compiled, in TFLOP/s (2 x parameters x tokens + attention), against --peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_bench import sync
from infscaled.generation import triton_decode
from infscaled.generation.gpu_sampling import sample_async
from infscaled.generation.graphs import DecodeStep
from infscaled.generation.kv import StageKV, reserved_span
from infscaled.generation.sampling import SamplingParams
from infscaled.models.sources import resolve
from infscaled.models.stage import Stage, build_stage, compile_stage, fuse_stage, skeleton


def set_compiled(stage: Stage, compiled: dict[int, Any], on: bool, mode: str | None = None) -> None:
    """Switch the stage's layers between their compiled twins and eager (twins kept across variants)."""
    for i, unit in enumerate(stage.units):
        if on and i in compiled:
            unit.__dict__["_compiled_layer"] = compiled[i]
            unit.__dict__["_compile_options"] = ("inductor", mode)
        else:
            unit.__dict__.pop("_compiled_layer", None)


def set_fused(stage: Stage, fused: dict[int, Any], on: bool) -> None:
    """Decode steps through the fused projections (on) or transformers' layer (off); the weights
    stay the fused ones' views either way."""
    for i, unit in enumerate(stage.units):
        if on and i in fused:
            unit.__dict__["_fused"] = fused[i]
        else:
            unit.__dict__.pop("_fused", None)


def whole_model(source: str, device: str, dtype: str) -> tuple[Stage, int, dict[int, Any]]:
    """The whole model as one stage (what a 1-stage job runs), its projections fused once as a
    generation stage's are (fuse_stage); with the vocabulary size and the fused layers by unit
    index (for set_fused)."""
    resolved = resolve(source)
    units = skeleton(resolved).unit_count
    vocab = resolved.family.config.vocab_size  # type: ignore[attr-defined]
    stage = build_stage(resolved, 0, units - 1, device, dtype, 0).eval()
    fuse_stage(stage)
    fused = {i: u.__dict__["_fused"] for i, u in enumerate(stage.units) if "_fused" in u.__dict__}
    return stage, vocab, fused


def matmul_params(stage: Stage) -> list[torch.nn.Parameter]:
    """The parameters every token's forward multiplies by: all but the embedding tables (a lookup
    of B rows), a tied lm_head counted once."""
    embed = {id(p) for n, p in stage.named_parameters() if "embed" in n or ".wte." in n or ".wpe." in n}
    head = {id(p) for n, p in stage.named_parameters() if "lm_head" in n}
    seen: set[int] = set()
    out = []
    for p in stage.parameters():
        if id(p) in seen or (id(p) in embed and id(p) not in head):
            continue
        seen.add(id(p))
        out.append(p)
    return out


def decode_bytes(stage: Stage) -> int:
    """Bytes of the parameters a decode step reads: all but the embedding table (B rows of it)."""
    return sum(p.numel() * p.element_size() for p in matmul_params(stage))


def run_variant(stage: Stage, kv: StageKV, device: torch.device, batch: int, attention: str, graphs: bool,
                steps: int, replays: int, vocab: int, gen: torch.Generator) -> tuple[dict[str, Any], list[torch.Tensor],
                                                                                 DecodeStep]:
    stepper = DecodeStep(stage, kv, device, "input_ids", batch, graphs=graphs, attention=attention)
    seqs = list(range(batch))
    greedy = [SamplingParams(max_new_tokens=1 << 20, temperature=0.0)] * batch
    times, outs = [], []
    for _ in range(steps):
        x = torch.randint(0, vocab, (batch, 1), generator=gen)
        sync(str(device))
        # What the engine does per step: the step, greedy tokens on the GPU, their async copy back.
        t = time.perf_counter()
        out = stepper.step(x, seqs)["output"]
        logits = out[:, -1] if out.dim() == 3 else out
        sample_async(logits, greedy, [None] * batch).tokens()
        times.append(time.perf_counter() - t)
        outs.append(logits.float().cpu())
    tail = times[steps // 2:]
    row: dict[str, Any] = {"attention": attention, "step_ms": 1e3 * statistics.median(tail),
                           "graph_replays": stepper.replays}
    graph = next((b.graph for b in stepper._buckets.values() if b.graph is not None), None)
    if graph is not None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        row["gpu_ms"] = start.elapsed_time(end) / replays
    return row, outs, stepper


def profile_replay(stepper: DecodeStep, top: int = 12) -> list[dict[str, Any]]:
    """The top kernels (by GPU time) of 5 replays of the stepper's graph, per replay."""
    from torch.profiler import ProfilerActivity, profile

    graph = next(b.graph for b in stepper._buckets.values() if b.graph is not None)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
    return top_kernels(prof, 5, top)


def top_kernels(prof: Any, runs: int, top: int = 12) -> list[dict[str, Any]]:
    """A profile's GPU work per run (step or prefill): its total and count first (kernels, copies
    and fills), then the `top` kernels by GPU time."""
    rows = []
    total = 0.0
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", 0.0) or getattr(e, "cuda_time_total", 0.0)
        if t <= 0 or e.key.startswith("cudaGraph"):
            continue
        total += t
        rows.append({"kernel": e.key[:90], "us_per_step": t / runs, "calls_per_step": e.count / runs})
    rows.sort(key=lambda r: -r["us_per_step"])
    return [{"total_us_per_step": total / runs, "kernels_per_step": sum(r["calls_per_step"] for r in rows)},
            *rows[:top]]


def prompt_flops(stage: Stage, rows: int, tokens: int, next_token_only: bool = False) -> float:
    """Matrix FLOPs of `rows` prompts of `tokens` each (no padding, no past): 2 x parameters x
    tokens (the lm_head on every position, or on each row's last one for a next-token head or
    `next_token_only`) plus causal attention, 2 x T^2 x (heads x head size) per row and layer
    (QK^T and PV, half each)."""
    params = matmul_params(stage)
    head = next((u for u in stage.units if hasattr(u, "lm_head")), None)
    last = next_token_only or getattr(head, "last", False)
    head_params = head.lm_head.weight.numel() if head is not None and last else 0
    cfg: Any = next(u.layer.self_attn.config for u in stage.units if hasattr(u, "layer"))
    width = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    layers = sum(1 for u in stage.units if hasattr(u, "layer"))
    linear = 2 * (sum(p.numel() for p in params) - head_params) * rows * tokens + 2 * head_params * rows
    return float(linear + 2 * layers * rows * tokens * tokens * width)


def forward_bench(stage: Stage, compiled: dict[int, Any], device: torch.device, batch: int, length: int,
                  vocab: int, peak: float) -> list[dict[str, Any]]:
    """Prompt processing without a cache (a forward job's micro-batch): eager and compiled."""
    flops = prompt_flops(stage, batch, length)
    ids = torch.randint(0, vocab, (batch, length), device=device)
    act = {"input_ids": ids, "attention_mask": torch.ones(batch, length, dtype=torch.int64)}
    rows = []
    for on in (False, True):
        set_compiled(stage, compiled, on)
        times = []
        for i in range(8):
            sync(str(device))
            t = time.perf_counter()
            stage(dict(act))
            sync(str(device))
            if i >= 3:
                times.append(time.perf_counter() - t)
        ms = 1e3 * statistics.median(times)
        rows.append({"compiled": on, "ms": ms, "tflops": flops / (ms / 1e3) / 1e12,
                     "of_peak": flops / (ms / 1e3) / 1e12 / peak})
        print(f"forward {batch}x{length}: compiled={on} {ms:.1f} ms, {rows[-1]['tflops']:.0f} TFLOP/s "
              f"({100 * rows[-1]['of_peak']:.0f}% of {peak:.0f})", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batches", default="8,64")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--variants", default="flex:compiled,flex:compiled:fused,triton:compiled:fused")
    ap.add_argument("--bw", type=float, default=4.8e12, help="memory bandwidth, bytes/s (H200 datasheet)")
    ap.add_argument("--peak", type=float, default=790.0, help="bf16 matrix TFLOP/s measured on the card")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--forward", action="store_true")
    ap.add_argument("--forward-batch", type=int, default=8)
    ap.add_argument("--forward-len", type=int, default=512)
    ap.add_argument("--out", default="out/decode_step")
    a = ap.parse_args()
    source = "builtin:llama-tiny" if a.tiny else "builtin:llama-3b"
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    dtype = "bfloat16" if cuda else "float32"
    stage, vocab, fused = whole_model(source, a.device, dtype)
    variants = [(*v.split(":")[:2], v.endswith(":fused")) for v in a.variants.split(",")]
    # Compiled twins of the layers per mode: "compiled" (inductor's default), "autotune"
    # (max-autotune-no-cudagraphs: inductor times Triton GEMM templates against cuBLAS per shape).
    twins: dict[str, dict[int, Any]] = {"eager": {}}
    for comp, mode in (("compiled", None), ("autotune", "max-autotune-no-cudagraphs")):
        if any(c == comp for _, c, _ in variants):
            compile_stage(stage, mode=mode)
            twins[comp] = {i: u.__dict__["_compiled_layer"] for i, u in enumerate(stage.units)
                           if "_compiled_layer" in u.__dict__}
    compiled = twins.get("compiled", {})
    bytes_read = decode_bytes(stage)
    bound_ms = 1e3 * bytes_read / a.bw
    print(f"{source} {dtype} on {torch.cuda.get_device_name(device) if cuda else 'cpu'}: decode reads "
          f"{bytes_read / 1e9:.2f} GB of weights -> bound {bound_ms:.3f} ms per step at {a.bw / 1e12:.1f} TB/s",
          flush=True)
    results: dict[str, Any] = {"card": torch.cuda.get_device_name(device) if cuda else "cpu", "model": source,
                               "dtype": dtype, "prompt": a.prompt, "weight_bytes": bytes_read, "bound_ms": bound_ms,
                               "torch": torch.__version__, "batches": {}}
    gen = torch.Generator().manual_seed(0)
    split_default = triton_decode.SPLIT_PROGRAMS
    with torch.inference_mode():
        for batch in [int(b) for b in a.batches.split(",")]:
            reserve = a.prompt + a.steps + 2
            prompt = torch.randint(0, vocab, (batch, a.prompt), generator=gen)
            rows = []
            base: list[torch.Tensor] | None = None
            best: tuple[float, DecodeStep | None] = (float("inf"), None)
            for attention, comp, on in variants:
                if not cuda and (attention, comp) != ("torch", "eager"):
                    continue
                mode = "max-autotune-no-cudagraphs" if comp == "autotune" else None
                set_compiled(stage, twins[comp], comp != "eager", mode)
                set_fused(stage, fused, on)
                kv = StageKV(batch * reserved_span(reserve), device)
                seqs = list(range(batch))
                pb = kv.prefill(seqs, [a.prompt] * batch, [reserve] * batch)
                mask = torch.ones(batch, a.prompt, dtype=torch.int64)
                stage({"input_ids": prompt.to(device), "attention_mask": mask}, pb)
                kv.store(seqs, pb)
                step_gen = torch.Generator().manual_seed(batch)
                t0 = time.perf_counter()
                # "triton-nosplit": the Triton kernel with one program per (row, kv head), as before
                # the split of few rows' positions (triton_decode.split_threshold), in the same run.
                triton_decode.SPLIT_PROGRAMS = 0 if attention.endswith("-nosplit") else split_default
                try:
                    row, outs, stepper = run_variant(stage, kv, device, batch, attention.removesuffix("-nosplit"),
                                                     cuda, a.steps, a.replays, vocab, step_gen)
                except Exception as exc:  # noqa: BLE001 - report the variant as failed, measure the others
                    msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
                    print(f"batch {batch:3d} {attention:6s} {comp:8s} {'fused' if on else 'layer':5s}: FAILED {msg}",
                          flush=True)
                    rows.append({"attention": attention, "compiled": comp, "fused": on, "error": msg})
                    continue
                row["compiled"] = comp
                row["fused"] = on
                row["first_steps_s"] = time.perf_counter() - t0  # includes compilation and capture
                if base is None:
                    base = outs
                row["worst_rel_diff"] = max(float((o - b).norm() / b.norm().clamp_min(1e-12))
                                            for o, b in zip(outs, base, strict=True))
                row["of_bound"] = bound_ms / row.get("gpu_ms", row["step_ms"])
                rows.append(row)
                kind = "fused" if on else "layer"
                print(f"batch {batch:3d} {attention:6s} {comp:8s} {kind:5s}: step {row['step_ms']:.3f} ms, "
                      f"gpu {row.get('gpu_ms', float('nan')):.3f} ms ({100 * row['of_bound']:.0f}% of bound), "
                      f"replays {row['graph_replays']}, worst rel diff {row['worst_rel_diff']:.1e}, "
                      f"{row['first_steps_s']:.1f} s incl. compile", flush=True)
                if cuda and row.get("gpu_ms", 1e9) < best[0]:
                    best = (row["gpu_ms"], stepper)
                else:
                    del stepper
                del kv, pb
            entry: dict[str, Any] = {"rows": rows}
            if a.profile and best[1] is not None:
                entry["profile"] = profile_replay(best[1])
                print(json.dumps(entry["profile"], indent=1), flush=True)
            results["batches"][str(batch)] = entry
            write(a.out, results)  # after each batch: a run cut short keeps what it measured
            best = (float("inf"), None)
            if cuda:
                torch.cuda.empty_cache()
        if a.forward:
            results["forward"] = forward_bench(stage, compiled, device, a.forward_batch, a.forward_len, vocab, a.peak)
    write(a.out, results)


def write(folder: str, results: dict[str, Any]) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_step.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
