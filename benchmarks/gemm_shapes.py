"""The decode step's matrix products alone: cuBLAS (separate and fused weights) against the Triton
skinny kernel (generation/skinny_gemm.py), per shape, at the memory-bandwidth bound.

    python -m benchmarks.gemm_shapes --out DIR          # on a GPU (llama-3b's layer shapes)
    python -m benchmarks.gemm_shapes --rows 8,128,2048 --fused-only --no-triton --kmajor --out DIR

--kmajor also times cuBLAS on each weight stored the other way round ([K, N] contiguous, passed
to F.linear as its transposed view: the same product, another kernel choice).

Each shape runs over 28 distinct weight copies (one per layer, 5.6 GB in all: nothing stays in
the 60 MB L2), captured in one CUDA graph and replayed; time per layer from CUDA events, and
the bandwidth that reading each weight once implies. Triton: a small sweep of tile shapes per
shape; the best is reported with its configuration.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.skinny_gemm import skinny_linear

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 3072, 8192, 24, 8, 128, 28
Q, KVN = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
SEPARATE = {"q": (Q, HIDDEN), "k": (KVN, HIDDEN), "v": (KVN, HIDDEN), "o": (HIDDEN, Q),
            "gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}
FUSED = {"qkv": (Q + 2 * KVN, HIDDEN), "o": (HIDDEN, Q), "gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}


def graph_time(fn: Any, replays: int = 20) -> float:
    """ms per call of fn (which runs all LAYERS copies), from a CUDA graph's replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def configs(n: int) -> list[dict[str, int]]:
    out = []
    for bn in (16, 32, 64):
        for bk in (128, 256, 512):
            split = 1
            while -(-n // bn) * split < 264 and split < 8:
                split *= 2
            out.append({"block_n": bn, "block_k": bk, "split_k": split})
            if split > 1:
                out.append({"block_n": bn, "block_k": bk, "split_k": 1})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="8,64")
    ap.add_argument("--out", default="out/gemm")
    ap.add_argument("--fused-only", action="store_true", help="only the fused layer's shapes")
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton skinny kernel's sweep")
    ap.add_argument("--kmajor", action="store_true", help="also cuBLAS on [K, N]-contiguous weights")
    a = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    shapes = dict(FUSED) if a.fused_only else {**SEPARATE, **FUSED}
    weights = {name: [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
               for name, (n, k) in shapes.items()}
    results: dict[str, Any] = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": {}}
    for m in [int(r) for r in a.rows.split(",")]:
        xs = {k: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for k in (HIDDEN, INTER)}
        table: dict[str, Any] = {}
        for name, (n, k) in shapes.items():
            ws, x = weights[name], xs[k]
            gb = n * k * 2 * LAYERS / 1e9
            cublas = graph_time(lambda ws=ws, x=x: [F.linear(x, w) for w in ws]) / LAYERS
            best: tuple[float, dict[str, int]] = (float("inf"), {})
            ref = F.linear(x, ws[0]).float()
            kmajor = None
            if a.kmajor:
                wts = [w.t().contiguous() for w in ws]
                got = F.linear(x, wts[0].t()).float()
                assert float((got - ref).norm() / ref.norm()) < 1e-2
                kmajor = graph_time(lambda wts=wts, x=x: [F.linear(x, w.t()) for w in wts]) / LAYERS
                del wts
            for cfg in ([] if a.no_triton else configs(n)):
                try:
                    got = skinny_linear(x, ws[0], **cfg).float()
                    err = float((got - ref).norm() / ref.norm())
                    if err > 1e-2:
                        print(f"  m={m} {name} {cfg}: WRONG rel err {err:.1e}", flush=True)
                        continue
                    t = graph_time(lambda ws=ws, x=x, cfg=cfg: [skinny_linear(x, w, **cfg) for w in ws]) / LAYERS
                except Exception as exc:  # noqa: BLE001 - a tile shape that does not build: skip it
                    print(f"  m={m} {name} {cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                    continue
                if t < best[0]:
                    best = (t, cfg)
            table[name] = {"n": n, "k": k, "cublas_us": 1e3 * cublas, "cublas_tbs": gb / LAYERS / cublas,
                           "triton_us": 1e3 * best[0], "triton_tbs": gb / LAYERS / best[0], "triton_cfg": best[1],
                           "kmajor_us": None if kmajor is None else 1e3 * kmajor,
                           "tflops": 2 * m * n * k / cublas / 1e9}
            print(f"m={m:3d} {name:8s} {n:6d}x{k:5d}: cuBLAS {1e3 * cublas:7.1f} us ({gb / LAYERS / cublas:4.2f} TB/s,"
                  f" {2 * m * n * k / cublas / 1e9:5.0f} TFLOP/s)"
                  + ("" if kmajor is None else f"  K-major {1e3 * kmajor:7.1f} us")
                  + ("" if a.no_triton
                     else f"  triton {1e3 * best[0]:7.1f} us ({gb / LAYERS / best[0]:4.2f} TB/s) {best[1]}"),
                  flush=True)
        for label, names in (("separate", SEPARATE), ("fused", FUSED)):
            if not all(nm in table for nm in names):
                continue
            for lib in ("cublas",) + (("kmajor",) if a.kmajor else ()) + (() if a.no_triton else ("triton",)):
                per_layer = sum(table[nm][f"{lib}_us"] for nm in names)
                table[f"{label}_{lib}_ms_per_step"] = per_layer * LAYERS / 1e3
                print(f"m={m:3d} {label:8s} {lib:6s}: {per_layer * LAYERS / 1e3:.3f} ms per 28 layers", flush=True)
        results["rows"][str(m)] = table
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "gemm_shapes.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
