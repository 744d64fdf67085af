"""One stage's decode step, eager against replayed from a CUDA graph (generation/graphs.py).

    python -m benchmarks.decode_step                        # on a GPU: llama-3b, both halves
    python -m benchmarks.decode_step --tiny --device cpu    # code-path dry run (eager only)

For each half of the model (embed + first half of the layers | the rest + head) on one GPU:
prefill --batch sequences of --prompt random tokens, then time --steps decode steps eagerly and
with graphs, from the same cache state (two caches filled by the same prefill), and compare the
outputs of the two: the graph must compute what the eager step computes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.gpu_bench import sync
from infscaled.generation.graphs import DecodeStep
from infscaled.generation.kv import StageKV, reserved_span
from infscaled.models.sources import resolve
from infscaled.models.stage import build_stage, skeleton


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="out/decode_step")
    a = ap.parse_args()
    source = "builtin:llama-tiny" if a.tiny else "builtin:llama-3b"
    dtype = "float32" if a.device == "cpu" else "bfloat16"
    device = torch.device(a.device)
    resolved = resolve(source)
    sk = skeleton(resolved)
    units = sk.unit_count
    hidden_size = resolved.family.config.hidden_size  # type: ignore[attr-defined]
    halves = [(0, units // 2 - 1), (units // 2, units - 1)]
    rows = []
    torch.manual_seed(0)
    for first, last in halves:
        stage = build_stage(resolved, first, last, a.device, dtype, 0).eval()
        is_first = first == 0
        reserve = a.prompt + a.steps + 1
        kvs = [StageKV(a.batch * reserved_span(reserve), device) for _ in range(2)]
        seqs = list(range(a.batch))
        with torch.inference_mode():
            if is_first:
                prompt = {"input_ids": torch.randint(0, 500, (a.batch, a.prompt), device=device)}
            else:
                prompt = {"hidden": torch.randn(a.batch, a.prompt, hidden_size, device=device,
                                                dtype=getattr(torch, dtype))}
            prompt["attention_mask"] = torch.ones(a.batch, a.prompt, dtype=torch.int64)
            for kv in kvs:
                batch = kv.prefill(seqs, [a.prompt] * a.batch, [reserve] * a.batch)
                stage({k: v.to(device) for k, v in prompt.items()}, batch)
                kv.store(seqs, batch)
            steppers = [DecodeStep(stage, kvs[0], device, "input_ids" if is_first else "hidden", a.batch, graphs=False),
                        DecodeStep(stage, kvs[1], device, "input_ids" if is_first else "hidden", a.batch, graphs=True)]
            key = "hidden" if last != units - 1 else "output"
            worst = 0.0
            times: list[list[float]] = [[], []]
            for _ in range(a.steps):
                if is_first:
                    x = torch.randint(0, 500, (a.batch, 1))
                else:
                    x = torch.randn(a.batch, 1, hidden_size, dtype=getattr(torch, dtype))
                outs = []
                for i, stepper in enumerate(steppers):
                    sync(str(device))
                    t = time.perf_counter()
                    out = stepper.step(x, seqs)[key].float().cpu()
                    sync(str(device))
                    times[i].append(time.perf_counter() - t)
                    outs.append(out)
                err = float((outs[1] - outs[0]).norm() / outs[0].norm().clamp_min(1e-12))
                worst = max(worst, err)
            tail = a.steps // 2
            eager_ms = 1e3 * sorted(times[0][tail:])[len(times[0][tail:]) // 2]
            graph_ms = 1e3 * sorted(times[1][tail:])[len(times[1][tail:]) // 2]
            row = {"units": [first, last], "eager_ms": eager_ms, "graph_ms": graph_ms, "speedup": eager_ms / graph_ms,
                   "worst_rel_diff": worst, "graph_replays": steppers[1].replays}
            rows.append(row)
            print(f"units {first}-{last}: eager {eager_ms:.2f} ms, graph {graph_ms:.2f} ms per step "
                  f"({row['speedup']:.1f}x), replays {steppers[1].replays}, worst relative diff {worst:.2e}",
                  flush=True)
        del stage, kvs, steppers
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    (out / "decode_step.json").write_text(json.dumps({"card": card, "model": source, "dtype": dtype,
                                                       "batch": a.batch, "prompt": a.prompt, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
