"""A generation stage's prefill, timed step by step as GenerationStage runs it (issue 14).

    python -m benchmarks.prefill_step                          # on a GPU: llama-3b bf16, the default shapes
    python -m benchmarks.prefill_step --shapes 1x128,8x512 --variants layer,fused --profile
    python -m benchmarks.prefill_step --tiny --device cpu      # code-path dry run (llama-tiny, float32)
    OUT=DIR PHASES=prefill PREFILL_ARGS="--profile" bash benchmarks/decode_device.sh   # on the device

Why: a 1-stage generation job on an H200 spends most of its time in prefills (BENCHMARKS.md
section 20 inferred ~34-60 ms per 1-row prefill of 128 tokens from a run's counts, against
~2.5 ms per decode step); this measures them directly and says where the time goes.

The whole model is one stage (decode_step.whole_model: what a 1-stage `infscaled run` builds,
projections fused by fuse_stage as GenerationStage does). One prefill is the work of
GenerationStage._prefill on the last (here the only) stage, engine/programs/generation.py, in
its order: fresh sequence ids admitted into one StageKV (`kv.prefill`: their pages, the page
index, the prompt's write index), the timing event `_timed` records, the stage's forward on the
prompts (host tensors moved to the device as `_run` does) writing keys and values into the pages,
`kv.store`, the next-token logits picked at each row's last position, `resume_sampling` per
sequence (its generator), `sample_async` (the first token; greedy unless --temperature), the
event `_mark` records, and the wait for the token on the host (`_complete`). Then the sequences
are freed (not timed). Prompts are random ids, every row the shape's TOKENS long (no padding),
the same for every variant of a shape; the reservation is prompt + --new.

Variants (--variants, comma-separated; default layer,fused), each eager:
- "layer": transformers' decoder layers (the unit's `_fused` entry removed, decode_step.set_fused):
  what prefills ran before the fused prefill step;
- "fused": the units' fused projections (fuse_stage), which LlamaBlock prefills through
  (models/families/fused_decode.py prefill_step). The switch is the `_fused` entry, whatever
  path it selects;
- modifiers, each optional, in any order: ":compiled" sets the layers' torch.compile twins
  (decode_step.set_compiled; CompilableLayer.layer_for runs prefill batches eagerly, so this
  changes nothing until a prefill path compiles); ":last" sets the batch's `last_logits` (the
  head computes each row's next-token logits only, as a prefill that asked for no prompt
  log-probabilities may); ":chunkN" prefills each prompt in chunks of N tokens (chunked
  prefill: each chunk one kv.prefill from its start position, attending to the earlier chunks'
  keys and values in the pages, as tests/test_generation_pipeline.py runs them), all chunks timed
  as one prefill. E.g. `--variants layer,fused,fused:last,fused:last:chunk256`.

Per shape (--shapes ROWSxTOKENS,...) and variant, medians over --iters after --warmup:
- wall_ms: the whole prefill above, admission to first token on the host (synchronised before).
- stage_ms (CUDA): GPU time between the stage's own two events (what its stats count as compute:
  launch gaps included).
- gpu_ms (CUDA): the GPU's own time, without launch gaps. Measured as gpu_events_ms: CUDA events
  around the admission, forward and store while a spin kernel (torch.cuda._sleep) holds the GPU
  until all of it is launched. When the host was not done by the spin's end
  (`gpu_launches_hidden` false: a host sync inside the forward, see `syncs`, or more launches
  than a CUDA stream queues, about a thousand), the events count gaps, and gpu_ms is kernel_ms
  instead (marked * in the table).
- host_ms = wall_ms - gpu_ms: what the prefill costs beyond the GPU's own work.
- phases_ms: host time per step: index (kv.prefill), forward (stage + store launched), select
  (next-token logits), resume (resume_sampling), sample (sample_async launched), wait (token on
  the host); a step that syncs includes the GPU time it waited for. free: kv.free afterwards.
- tokens_per_s; tflops = FLOPs / wall (decode_step.prompt_flops: 2 x parameters x tokens, the
  lm_head on one token per row with ":last", + causal attention; the same for chunks, whose
  gathered past costs more) and of_peak against --peak; tflops_gpu = FLOPs / gpu_ms.
- kernels, kernel_ms (CUDA): GPU operations (kernels, copies, fills) of one profiled prefill and
  their summed time (decode_step.top_kernels): the GPU's busy time, gaps never included.
- syncs (CUDA): synchronising CUDA calls in one prefill before its wait for the token
  (torch.cuda.set_sync_debug_mode), counted by the source line that made them.
- logits_diff, kv_diff: largest relative difference from the first variant's next-token logits
  and keys/values written to the pages (every layer).
--profile adds the top kernels, the top host (CPU) ops by self time, and the prefill's Chrome
trace summarised by benchmarks/trace_summary.py (the GPU's busy fraction of the prefill's window:
low means launch-bound); --traces keeps the traces. Output: --out/prefill_step_<device>.json,
written after each shape, and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.decode_step import prompt_flops, set_compiled, set_fused, top_kernels, whole_model
from benchmarks.gpu_bench import sync
from benchmarks.trace_summary import summarise
from infscaled.generation.gpu_sampling import PendingTokens, sample_async
from infscaled.generation.kv import PAGE_TOKENS, StageKV, reserved_span
from infscaled.generation.sampling import SamplingParams, resume_sampling
from infscaled.models.stage import Stage, compile_stage
from infscaled.protocol.generation import SequenceSpec

PHASES = ("index", "forward", "select", "resume", "sample", "wait")
DEFAULT_SHAPES = "1x128,8x128,1x512,4x512,1x2048"
TINY_SHAPES = "1x16,8x16,1x64,4x64,1x128"  # llama-tiny has 256 positions


@dataclass(frozen=True)
class Variant:
    """How one prefill runs: --variants' BASE[:compiled][:last][:chunkN]."""

    name: str
    fused: bool  # the units' fused projections (their `_fused` entry), else transformers' layers
    compiled: bool = False  # the layers' torch.compile twins set
    last: bool = False  # PagedBatch.last_logits: the head computes next-token logits only
    chunk: int = 0  # prompts in chunks of this many tokens (0: whole)


class Marks:
    """Host time per step of a prefill (PHASES), summed over chunks, when timing; else a no-op."""

    def __init__(self, on: bool) -> None:
        self.on = on
        self.ms: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, phase: str) -> None:
        if self.on:
            now = time.perf_counter()
            self.ms[phase] = self.ms.get(phase, 0.0) + 1e3 * (now - self._last)
            self._last = now


class Prefiller:
    """GenerationStage._prefill of a one-stage chain, split so its parts can be timed alone."""

    def __init__(self, stage: Stage, kv: StageKV, device: torch.device, new: int, temperature: float) -> None:
        self.stage, self.kv, self.device = stage, kv, device
        self.new = new
        self.sampling = SamplingParams(max_new_tokens=new, temperature=temperature, seed=0 if temperature else None)
        self.cuda = device.type == "cuda"
        self.variant = Variant("layer", False)
        self._next_seq = 0

    def specs(self, rows: int, tokens: int) -> list[SequenceSpec]:
        """Fresh sequences (ids never reused, as the dispatcher numbers them)."""
        first, self._next_seq = self._next_seq, self._next_seq + rows
        return [SequenceSpec(s, tokens, tokens + self.new, self.sampling) for s in range(first, first + rows)]

    def forward(self, specs: list[SequenceSpec], ids: torch.Tensor, mask: torch.Tensor,
                mark: Marks) -> tuple[dict[str, torch.Tensor], int, Any]:
        """Admission, forward, store (`_prefill` up to `_run`'s return), chunk after chunk with
        --variants' chunkN; the last chunk's output and width."""
        seqs = [s.seq for s in specs]
        rows, total = ids.shape
        width = self.variant.chunk or total
        began = None
        for a in range(0, total, width):
            n = min(width, total - a)
            pb = self.kv.prefill(seqs, [n] * rows, [s.reserve for s in specs], [a] * rows)
            pb.last_logits = self.variant.last
            act = {"input_ids": ids[:, a:a + n], "attention_mask": mask[:, a:a + n]}  # host, as a Prefill brings them
            if self.variant.chunk:  # a chunk's rows say where they start (tests/test_generation_pipeline.py)
                act["position_ids"] = a + torch.arange(n).expand(rows, n)
            mark("index")
            if self.cuda and began is None:  # `_timed` on the last stage: GPU time from two events
                began = torch.cuda.Event(enable_timing=True)
                began.record(torch.cuda.current_stream(self.device))
            out: dict[str, torch.Tensor] = self.stage({k: v.to(self.device, non_blocking=True)
                                                       for k, v in act.items()}, pb)
            self.kv.store(seqs, pb)
            mark("forward")
        return out, n, began

    def first_token(self, specs: list[SequenceSpec], out: dict[str, torch.Tensor], width: int, began: Any,
                    mark: Marks) -> tuple[PendingTokens, torch.Tensor, Any]:
        """The rest of `_prefill` and `_sampled`'s common case (plain sampling, no prompt log-probs)."""
        logits = out["output"]  # [n, T, V], or [n, V] for a next-token head
        if logits.dim() == 3:  # `_prefill`'s own lines (a sync found here is `_prefill`'s)
            index = torch.tensor([width] * len(specs), device=logits.device) - 1
            logits = logits[torch.arange(len(specs), device=logits.device), index]  # [n, V]
        mark("select")
        states = [resume_sampling(spec, logits.shape[-1], self.device) for spec in specs]
        mark("resume")
        pending = sample_async(logits, [st.params for st in states], [st.generator for st in states])
        ended = None
        if began is not None:  # `_mark`
            ended = torch.cuda.Event(enable_timing=True)
            ended.record(torch.cuda.current_stream(self.device))
        mark("sample")
        return pending, logits, ended

    def launch(self, specs: list[SequenceSpec], ids: torch.Tensor, mask: torch.Tensor,
               mark: Marks) -> tuple[PendingTokens, torch.Tensor, Any, Any]:
        """The whole prefill up to the wait for its first token."""
        out, width, began = self.forward(specs, ids, mask, mark)
        pending, logits, ended = self.first_token(specs, out, width, began, mark)
        return pending, logits, began, ended

    def once(self, rows: int, ids: torch.Tensor, mask: torch.Tensor, timed: bool = False,
             keep: bool = False) -> dict[str, Any]:
        """One whole prefill; the sequences are freed after it unless `keep` (then returned)."""
        specs = self.specs(rows, ids.shape[1])
        sync(str(self.device))
        t0 = time.perf_counter()
        mark = Marks(timed)
        pending, logits, began, ended = self.launch(specs, ids, mask, mark)
        pending.tokens()
        wall = time.perf_counter() - t0
        mark("wait")
        result: dict[str, Any] = {"wall_ms": 1e3 * wall, "phases_ms": mark.ms}
        if ended is not None:
            ended.synchronize()
            result["stage_ms"] = began.elapsed_time(ended)
        if keep:
            result.update(specs=specs, logits=logits)
            return result
        t = time.perf_counter()
        self.kv.free([s.seq for s in specs])
        result["phases_ms"]["free"] = 1e3 * (time.perf_counter() - t)
        return result

    def gpu_ms(self, rows: int, ids: torch.Tensor, mask: torch.Tensor, spin_ms: float,
               cycles_per_ms: float) -> tuple[float, bool]:
        """GPU time of admission + forward + store with every launch queued behind a spin kernel,
        and whether the host was done launching before the spin ended (else gaps are counted)."""
        specs = self.specs(rows, ids.shape[1])
        torch.cuda.synchronize(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        torch.cuda._sleep(int(spin_ms * cycles_per_ms))
        start.record()
        self.forward(specs, ids, mask, Marks(False))
        end.record()
        issued_ms = 1e3 * (time.perf_counter() - t0)
        end.synchronize()
        self.kv.free([s.seq for s in specs])
        return start.elapsed_time(end), issued_ms < spin_ms


def spin_cycles_per_ms() -> float:
    """torch.cuda._sleep's clock cycles per millisecond on this GPU (its SM clock)."""
    cycles = 20_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(cycles)  # warm
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / start.elapsed_time(end)


def written_kv(stage: Stage, kv: StageKV, specs: list[SequenceSpec]) -> list[torch.Tensor]:
    """Every layer's keys and values at the sequences' prompt positions, read from the pages."""
    pages, offsets = [], []
    for spec in specs:
        owned = kv.pages[spec.seq]
        pages += [owned[p // PAGE_TOKENS] for p in range(spec.prompt_len)]
        offsets += [p % PAGE_TOKENS for p in range(spec.prompt_len)]
    page_t = torch.tensor(pages, device=kv.device)
    offset_t = torch.tensor(offsets, device=kv.device)
    out = []
    for unit in stage.units:
        layer = getattr(unit, "layer", None)
        pools = kv.pools_of(layer.self_attn.layer_idx) if layer is not None else None
        if pools is not None:
            out += [pools[0][page_t, offset_t].clone(), pools[1][page_t, offset_t].clone()]
    return out


def rel_diff(xs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    return max((float((x.float() - r.float()).norm() / r.float().norm().clamp_min(1e-12))
                for x, r in zip(xs, refs, strict=True)), default=0.0)


def count_syncs(pre: Prefiller, rows: int, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, int]:
    """Synchronising CUDA calls of one prefill before its wait for the token (the one wait the
    engine means to make), by the Python source line that made them."""
    specs = pre.specs(rows, ids.shape[1])
    torch.cuda.synchronize(pre.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            pending, *_ = pre.launch(specs, ids, mask, Marks(False))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    pending.tokens()
    pre.kv.free([s.seq for s in specs])
    where = Counter("/".join(Path(w.filename).parts[-3:]) + f":{w.lineno}" for w in caught
                    if "synchroniz" in str(w.message))
    return dict(where.most_common())


def top_host_ops(prof: Any, top: int = 15) -> list[dict[str, Any]]:
    """The host ops of one profiled prefill by self CPU time (launch calls count under their op)."""
    rows = [{"op": e.key[:90], "self_cpu_us": round(e.self_cpu_time_total, 1), "cpu_us": round(e.cpu_time_total, 1),
             "calls": e.count} for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
    rows.sort(key=lambda r: -r["self_cpu_us"])
    return [{"op_calls": sum(r["calls"] for r in rows), "self_cpu_us": round(sum(r["self_cpu_us"] for r in rows), 1)},
            *rows[:top]]


def profile_prefill(pre: Prefiller, rows: int, ids: torch.Tensor, mask: torch.Tensor, full: bool, trace: Path | None,
                    top: int) -> dict[str, Any]:
    """One prefill under the profiler: its GPU work (CUDA); with `full` also its host ops, and the
    Chrome trace's summary (benchmarks/trace_summary.py), the trace kept at `trace` if given."""
    from torch.profiler import ProfilerActivity, profile

    cuda = pre.cuda
    result: dict[str, Any] = {}
    if cuda:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            pre.once(rows, ids, mask)
            torch.cuda.synchronize()
        kernels = top_kernels(prof, 1, top)
        result["kernels"] = round(kernels[0]["kernels_per_step"])
        result["kernel_ms"] = kernels[0]["total_us_per_step"] / 1e3
        if full:
            result["top_kernels"] = kernels[1:]
    if full:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            pre.once(rows, ids, mask)
            sync(str(pre.device))
        result["top_host_ops"] = top_host_ops(prof, top)
        if cuda:
            path = trace or Path("/tmp") / f"prefill_trace_{time.monotonic_ns()}.json"
            prof.export_chrome_trace(str(path))
            result["trace_summary"] = summarise(str(path))
            if trace is None:
                path.unlink()
    return result


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", item)
        if m is None or int(m[1]) < 1 or int(m[2]) < 1:
            raise ValueError(f"--shapes: {item!r} is not ROWSxTOKENS with both >= 1 (e.g. 1x128,8x512)")
        shapes.append((int(m[1]), int(m[2])))
    return shapes


def parse_variants(text: str) -> list[Variant]:
    """'layer' or 'fused', each with optional ':compiled', ':last', ':chunkN' (any order)."""
    out = []
    for item in text.split(","):
        base, *mods = item.strip().split(":")
        chunks = [int(m[5:]) for m in mods if re.fullmatch(r"chunk[1-9]\d*", m)]
        unknown = [m for m in mods if m not in ("compiled", "last") and not re.fullmatch(r"chunk[1-9]\d*", m)]
        if base not in ("layer", "fused") or unknown or len(chunks) > 1 or len(set(mods)) < len(mods):
            raise ValueError(f"--variants: {item!r} is not layer or fused, each modifier at most once of :compiled, "
                             f":last, :chunkN with N >= 1 (e.g. layer,fused,fused:last,fused:last:chunk256)")
        out.append(Variant(item.strip(), base == "fused", "compiled" in mods, "last" in mods,
                           chunks[0] if chunks else 0))
    return out


def run_variant(pre: Prefiller, a: argparse.Namespace, rows: int, ids: torch.Tensor, mask: torch.Tensor,
                cycles_per_ms: float | None, trace: Path | None) -> dict[str, Any]:
    for _ in range(a.warmup):
        pre.once(rows, ids, mask)
    runs = [pre.once(rows, ids, mask, timed=True) for _ in range(a.iters)]
    row: dict[str, Any] = {"wall_ms": statistics.median(r["wall_ms"] for r in runs),
                           "phases_ms": {p: statistics.median(r["phases_ms"][p] for r in runs)
                                         for p in (*PHASES, "free")}}
    row.update(profile_prefill(pre, rows, ids, mask, a.profile, trace, a.top))
    if pre.cuda:
        row["stage_ms"] = statistics.median(r["stage_ms"] for r in runs)
        assert cycles_per_ms is not None
        # The spin must outlast the host's launching: twice its time for these steps, plus margin.
        spin_ms = min(1000.0, 2 * (row["phases_ms"]["index"] + row["phases_ms"]["forward"]) + 5)
        timed = [pre.gpu_ms(rows, ids, mask, spin_ms, cycles_per_ms) for _ in range(a.gpu_iters)]
        row["gpu_events_ms"] = statistics.median(t for t, _ in timed)
        row["gpu_launches_hidden"] = all(hidden for _, hidden in timed)
        # Gaps in the events' time when the host could not launch ahead: the kernels' own sum then.
        row["gpu_ms"] = row["gpu_events_ms"] if row["gpu_launches_hidden"] else row["kernel_ms"]
        row["host_ms"] = row["wall_ms"] - row["gpu_ms"]
        row["syncs"] = count_syncs(pre, rows, ids, mask)
    return row


def card_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--tiny", action="store_true", help="builtin:llama-tiny (a CPU dry run)")
    ap.add_argument("--model", default=None, help="model source (default builtin:llama-3b, or llama-tiny with --tiny)")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--shapes", default=None, help=f"ROWSxTOKENS,... (default {DEFAULT_SHAPES}; --tiny {TINY_SHAPES})")
    ap.add_argument("--variants", default="layer,fused",
                    help="layer / fused, each with optional :compiled, :last, :chunkN (see the module docstring)")
    ap.add_argument("--new", type=int, default=128, help="tokens each sequence reserves beyond its prompt")
    ap.add_argument("--temperature", type=float, default=0.0, help="first-token sampling (0: greedy)")
    ap.add_argument("--kv-budget", type=int, default=0, help="StageKV tokens (0: what the largest shape needs)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--gpu-iters", type=int, default=5)
    ap.add_argument("--peak", type=float, default=790.0, help="bf16 matrix TFLOP/s of the card (H200: ~790)")
    ap.add_argument("--profile", action="store_true", help="top kernels, top host ops, trace summary")
    ap.add_argument("--traces", action="store_true", help="with --profile: keep each prefill's Chrome trace")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--out", default="out/prefill_step")
    a = ap.parse_args()
    try:
        shapes = parse_shapes(a.shapes or (TINY_SHAPES if a.tiny else DEFAULT_SHAPES))
        variants = parse_variants(a.variants)
    except ValueError as exc:
        ap.error(str(exc))
    if min(a.warmup, a.new) < 0 or min(a.iters, a.gpu_iters) < 1:
        ap.error("--warmup and --new must be >= 0, --iters and --gpu-iters >= 1")
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: CUDA is not available here (use --device cpu for a dry run)")
    source = a.model or ("builtin:llama-tiny" if a.tiny else "builtin:llama-3b")
    dtype = a.dtype or ("bfloat16" if cuda else "float32")
    stage, vocab, fused = whole_model(source, a.device, dtype)
    cfg: Any = next(u.layer.self_attn.config for u in stage.units if hasattr(u, "layer"))
    for rows, tokens in shapes:
        if tokens + a.new > cfg.max_position_embeddings:
            ap.error(f"--shapes {rows}x{tokens}: prompt + --new {a.new} exceeds the model's "
                     f"{cfg.max_position_embeddings} positions")
    if any(v.fused for v in variants) and not fused:
        ap.error(f"{source}: no layer has fused projections (fuse_stage), so variant 'fused' means nothing here")
    needed = max(rows * reserved_span(tokens + a.new) for rows, tokens in shapes)
    if a.kv_budget and a.kv_budget < needed:
        ap.error(f"--kv-budget {a.kv_budget}: the largest shape needs {needed} tokens (rows x prompt + --new, "
                 f"in whole pages of {PAGE_TOKENS})")
    twins: dict[int, Any] = {}
    if any(v.compiled for v in variants):
        compile_stage(stage)
        twins = {i: u.__dict__["_compiled_layer"] for i, u in enumerate(stage.units) if "_compiled_layer" in u.__dict__}
    kv = StageKV(a.kv_budget or needed, device)  # one per stage, its pools allocated by the first prefill
    pre = Prefiller(stage, kv, device, a.new, a.temperature)
    card = card_name(device)
    results: dict[str, Any] = {
        "card": card, "model": source, "dtype": dtype, "torch": torch.__version__, "peak_tflops": a.peak,
        "new_tokens": a.new, "temperature": a.temperature, "kv_budget_tokens": kv.budget_tokens,
        "warmup": a.warmup, "iters": a.iters, "shapes": {}}
    cycles_per_ms = spin_cycles_per_ms() if cuda else None
    results["spin_cycles_per_ms"] = cycles_per_ms
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"prefill_step_{re.sub(r'[^a-z0-9]+', '-', card.lower()).strip('-')}.json"
    print(f"{source} {dtype} on {card}: prefills as GenerationStage runs them; FLOPs = 2 x params x tokens "
          f"+ causal attention; peak {a.peak:.0f} TFLOP/s", flush=True)
    print(header(), flush=True)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rows, tokens in shapes:
            ids = torch.randint(0, vocab, (rows, tokens), generator=gen)  # the same prompts for every variant
            results["shapes"][f"{rows}x{tokens}"] = measure_shape(pre, a, variants, fused, twins, ids, out,
                                                                  cycles_per_ms)
            path.write_text(json.dumps(results, indent=2))  # after each shape: a cut-short run keeps what it measured
            if cuda:
                torch.cuda.empty_cache()
    print(f"wrote {path}", flush=True)


def measure_shape(pre: Prefiller, a: argparse.Namespace, variants: list[Variant],
                  fused: dict[int, Any], twins: dict[int, Any], ids: torch.Tensor, out: Path,
                  cycles_per_ms: float | None) -> dict[str, Any]:
    """Every variant's prefill of these prompts (ids [rows, tokens]), printed as it is measured."""
    stage, kv = pre.stage, pre.kv
    rows, tokens = ids.shape
    mask = torch.ones(rows, tokens, dtype=torch.int64)
    entry: dict[str, Any] = {"rows": rows, "tokens": tokens, "variants": []}
    ref: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
    for v in variants:
        set_fused(stage, fused, v.fused)
        set_compiled(stage, twins, v.compiled)
        pre.variant = v
        trace = out / f"prefill_trace_{rows}x{tokens}_{v.name.replace(':', '_')}.json" if a.traces else None
        described = {"variant": v.name, "fused": v.fused, "compiled": v.compiled, "last_logits": v.last,
                     "chunk": v.chunk}
        try:
            row = {**described, **run_variant(pre, a, rows, ids, mask, cycles_per_ms, trace)}
            kept = pre.once(rows, ids, mask, keep=True)
            check = ([kept["logits"].float().cpu()], written_kv(stage, kv, kept["specs"]))
        except Exception as exc:  # noqa: BLE001 - report the variant as failed, measure the others
            msg = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            print(f"{rows}x{tokens} {v.name}: FAILED {msg}", flush=True)
            entry["variants"].append({**described, "error": msg})
            continue
        finally:
            kv.free(list(kv.seqs))  # the kept sequences, or whatever a failure left admitted
        row["flops"] = flops = prompt_flops(stage, rows, tokens, v.last)
        row["tokens_per_s"] = rows * tokens / (row["wall_ms"] / 1e3)
        row["tflops"] = flops / (row["wall_ms"] / 1e3) / 1e12
        row["of_peak"] = row["tflops"] / a.peak
        if "gpu_ms" in row:
            row["tflops_gpu"] = flops / (row["gpu_ms"] / 1e3) / 1e12
        ref = ref or check
        row["logits_diff"], row["kv_diff"] = rel_diff(check[0], ref[0]), rel_diff(check[1], ref[1])
        entry["variants"].append(row)
        print(line(f"{rows}x{tokens}", row), flush=True)
        if a.profile:
            print(profile_lines(row), flush=True)
    return entry


def profile_lines(r: dict[str, Any]) -> str:
    """--profile's findings for one row, indented under it."""
    out = []
    if "trace_summary" in r and r["trace_summary"].get("kernels"):
        t = r["trace_summary"]
        out.append(f"    trace: {t['kernels']} kernels, GPU busy {t['compute_busy_ms']:.2f} ms of the "
                   f"{t['window_ms']:.2f} ms from first to last kernel ({100 * t['compute_busy_frac']:.0f}%)")
    for k in r.get("top_kernels", []):
        out.append(f"    kernel {k['us_per_step']:9.1f} us {k['calls_per_step']:5.0f} x  {k['kernel']}")
    if "top_host_ops" in r:
        total, *ops = r["top_host_ops"]
        out.append(f"    host ops: {total['op_calls']} calls, {total['self_cpu_us'] / 1e3:.2f} ms self CPU (profiled)")
        out += [f"    host {o['self_cpu_us']:11.1f} us {o['calls']:5d} x  {o['op']}" for o in ops]
    return "\n".join(out)


def header() -> str:
    cols = ("shape", "variant", "wall ms", "gpu ms", "host ms", "stage ms", "kern ms", "tok/s", "TFLOP/s", "peak",
            "kernels", "syncs", "diff", "  host steps ms: " + " / ".join(PHASES))
    return "{:<7} {:<20} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7} {:>5} {:>7} {:>5} {:>7} {}".format(*cols)


def line(shape: str, r: dict[str, Any]) -> str:
    def ms(key: str) -> str:
        return f"{r[key]:.2f}" if key in r else "-"

    diff = max(r["logits_diff"], r["kv_diff"])
    steps = " / ".join(f"{r['phases_ms'][p]:.2f}" for p in PHASES)
    hidden = "" if r.get("gpu_launches_hidden", True) else "*"
    return (f"{shape:<7} {r['variant']:<20} {ms('wall_ms'):>8} {ms('gpu_ms') + hidden:>8} {ms('host_ms'):>8} "
            f"{ms('stage_ms'):>8} {ms('kernel_ms'):>8} {r['tokens_per_s']:>9.0f} {r['tflops']:>7.3g} "
            f"{100 * r['of_peak']:>4.0f}% "
            f"{r.get('kernels', '-'):>7} {sum(r['syncs'].values()) if 'syncs' in r else '-':>5} {diff:>7.1e}   {steps}")


if __name__ == "__main__":
    main()
