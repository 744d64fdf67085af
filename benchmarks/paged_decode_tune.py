"""The paged decode kernel's launch choices, measured (issue 14): tile, warps, pipeline stages.

    python -m benchmarks.paged_decode_tune --out DIR          # on a GPU: llama-3b's attention shapes

generation/triton_decode.py runs one program per (sequence, kv head) over the sequence's pages in
tiles of BLOCK_T positions. Per batch size and context length this times every combination of
--block-t x --warps x --stages: --layers launches (each layer its own pools, as a model's step
reads them: nothing stays in L2) captured in one CUDA graph, replayed --replays times between
CUDA events; and --split-programs, the split of few rows' positions across programs
(triton_decode.split_threshold, 0 = none). Reports µs per layer, the bandwidth of the keys and
values it reads, and the largest difference of each configuration's output from the default's
(all must agree within rounding: the math is the same, only the schedule differs). Writes DIR/paged_decode_tune.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.gemm_shapes import graph_time
from infscaled.generation import triton_decode
from infscaled.generation.kv import PAGE_TOKENS


def _case(batch: int, context: int, layers: int, hq: int, hkv: int, dh: int, device: str,
          seed: int) -> list[tuple[torch.Tensor, ...]]:
    """Per layer: query [B, Hq, Dh], pools with the batch's pages shuffled, table, positions."""
    gen = torch.Generator().manual_seed(seed)
    per_row = -(-context // PAGE_TOKENS)
    pages = batch * per_row
    out = []
    for _ in range(layers):
        pool_k = torch.randn(pages + 1, PAGE_TOKENS, hkv, dh, dtype=torch.bfloat16, device=device)
        pool_v = torch.randn(pages + 1, PAGE_TOKENS, hkv, dh, dtype=torch.bfloat16, device=device)
        order = torch.randperm(pages, generator=gen)
        table = order.view(batch, per_row).to(device)
        positions = torch.full((batch,), context - 1, dtype=torch.int64, device=device)
        query = torch.randn(batch, hq, dh, dtype=torch.bfloat16, device=device)
        out.append((query, pool_k, pool_v, table, positions))
    return out


def _time(layers: list[tuple[torch.Tensor, ...]], replays: int, **launch: Any) -> tuple[float, torch.Tensor]:
    """µs per launch over a graph of one launch per layer; the first layer's output (eager)."""
    def run() -> None:
        for q, k, v, t, p in layers:
            triton_decode._launch(q, k, v, t, p, q.shape[-1] ** -0.5, 0, **launch)
    q, k, v, t, p = layers[0]
    first = triton_decode._launch(q, k, v, t, p, q.shape[-1] ** -0.5, 0, **launch)
    return graph_time(run, replays) * 1000 / len(layers), first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="8,64,128")
    ap.add_argument("--contexts", default="192,1024")
    ap.add_argument("--block-t", default="16,32,64,128")
    ap.add_argument("--warps", default="1,2,4,8")
    ap.add_argument("--stages", default="1,2,3,4")
    ap.add_argument("--split-programs", default="",
                    help="split thresholds in programs (0: one program per row and kv head; default: 0 and "
                         "triton_decode.split_threshold of the card, 264 on an H200)")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--heads", default="24,8,128", help="query heads, kv heads, head size (llama-3b)")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--bw", type=float, default=4.8e12)
    ap.add_argument("--out", default="out/paged_decode_tune")
    args = ap.parse_args()
    hq, hkv, dh = (int(x) for x in args.heads.split(","))
    threshold = triton_decode.split_threshold(torch.device("cuda"))
    args.split_programs = args.split_programs or f"0,{threshold}"
    default = {"block_t": triton_decode.BLOCK_T, "num_warps": triton_decode.NUM_WARPS,
               "num_stages": triton_decode.NUM_STAGES, "split_programs": threshold}
    doc: dict[str, Any] = {"card": torch.cuda.get_device_name(), "heads": [hq, hkv, dh], "default": default,
                           "cases": []}
    for batch, context in itertools.product((int(b) for b in args.batches.split(",")),
                                            (int(c) for c in args.contexts.split(","))):
        layers = _case(batch, context, args.layers, hq, hkv, dh, "cuda", seed=batch + context)
        kv_bytes = batch * context * hkv * dh * 2 * 2  # keys and values, bf16
        base_us, want = _time(layers, args.replays)
        rows = []
        for bt, w, st, sp in itertools.product(*(map(int, a.split(",")) for a in (args.block_t, args.warps,
                                                                                    args.stages, args.split_programs))):
            key = {"block_t": bt, "num_warps": w, "num_stages": st, "split_programs": sp}
            try:
                us, got = _time(layers, args.replays, block_t=bt, num_warps=w, num_stages=st, split_programs=sp)
            except Exception as e:  # noqa: BLE001 - a tile that does not fit (shared memory) is reported, not fatal
                rows.append({**key, "error": str(e).splitlines()[0][:120]})
                continue
            rows.append({**key, "us": us, "tb_s": kv_bytes / us / 1e6,
                         "max_diff": float((got.float() - want.float()).abs().max())})
        ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        case = {"batch": batch, "context": context, "kv_mb_per_layer": kv_bytes / 1e6, "default_us": base_us,
                "bound_us": kv_bytes / args.bw * 1e6, "best": ok[:5], "rows": rows}
        doc["cases"].append(case)
        best = ok[0]
        print(f"batch {batch:4d} context {context:5d}: default {base_us:6.1f} µs/layer, best {best['us']:6.1f} "
              f"(block_t {best['block_t']}, warps {best['num_warps']}, stages {best['num_stages']}, "
              f"split {best['split_programs']}, {best['tb_s']:.2f} TB/s, diff {best['max_diff']:.1e}), "
              f"bound {case['bound_us']:.1f}", flush=True)
        for r in rows:  # the default tile with each split setting
            if "us" in r and (r["block_t"], r["num_warps"]) == (triton_decode.BLOCK_T, triton_decode.NUM_WARPS):
                print(f"    block_t {r['block_t']} warps {r['num_warps']} stages {r['num_stages']} "
                      f"split {r['split_programs']}: {r['us']:6.1f} µs", flush=True)
        del layers
        torch.cuda.empty_cache()
    # The configuration with the least total time over every case, beside the default.
    names = ("block_t", "num_warps", "num_stages", "split_programs")
    totals: dict[tuple[int, ...], float] = {}
    for case in doc["cases"]:
        for r in case["rows"]:
            if "us" in r:
                key = tuple(r[n] for n in names)
                totals[key] = totals.get(key, 0.0) + r["us"]
    complete = {k: v for k, v in totals.items()
                if sum(1 for c in doc["cases"] for r in c["rows"] if "us" in r
                       and tuple(r[n] for n in names) == k) == len(doc["cases"])}
    best_all = min(complete, key=complete.__getitem__)
    doc["best_overall"] = {**dict(zip(names, best_all, strict=True)), "total_us": complete[best_all],
                           "default_total_us": sum(c["default_us"] for c in doc["cases"])}
    print("best over all cases:", doc["best_overall"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "paged_decode_tune.json").write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
