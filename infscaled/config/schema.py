"""The job file as nested frozen dataclasses (see docs/job-file.md for the user-facing reference).

Instances are built by `parse_job`/`load_job`, which validate every field; constructing them
by hand skips those checks. Relative paths are already resolved to absolute ones here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from infscaled.protocol.plan import GenerationPlan
from infscaled.protocol.plan import Recovery as RecoveryConfig

DTYPES: Final = ("float32", "bfloat16", "float16")
GRAPHS: Final = ("mesh", "parallel", "explicit")
POLICIES: Final = ("round_robin", "random", "shortest_queue", "static", "weighted")
AUTO_DEVICES: Final = "auto"
PLACEMENT_POLICIES: Final = ("pack", "spread", "static")


@dataclass(frozen=True)
class ModelConfig:
    """[model]: what to serve."""

    source: str
    """"builtin:NAME", "python:MODULE:FACTORY", an absolute model directory, or a Hugging Face id."""
    dtype: str = "float32"
    """Parameter and activation dtype; one of DTYPES."""
    seed: int = 0
    """Seed for randomly initialised weights (builtin:, python:, or HF configs without weights)."""


@dataclass(frozen=True)
class PipelineConfig:
    """[pipeline]: how the model is cut into stages and how stages are connected."""

    stages: int | None = None
    """Stage count, balanced by parameter count at plan time; None when `layers` is given."""
    layers: tuple[tuple[int, int], ...] | None = None
    """Inclusive (first_unit, last_unit) per stage; None when `stages` is given."""
    replicas: tuple[int, ...] = ()
    """Replica count per stage; always one entry per stage after loading (default all 1)."""
    graph: str = "mesh"
    """How replicas of consecutive stages are linked; one of GRAPHS."""
    edges: tuple[tuple[str, str], ...] = ()
    """("STAGE.REPLICA", "STAGE.REPLICA") pairs between consecutive stages; only for graph "explicit"."""
    policy: str = "round_robin"
    """How a sender picks among its downstream replicas; one of POLICIES."""
    micro_batch_size: int = 8
    """Samples per micro-batch."""
    max_inflight: int = 4
    """Micro-batches in flight in the whole pipeline at once."""
    cuda_graphs: bool = True
    """CUDA stages replay their forward (generation: their decode step) as CUDA graphs; no effect on CPU."""
    compile: bool = False
    """CUDA stages torch.compile their decoder layers (forward micro-batches, decode steps); no effect on CPU."""
    max_wait_ms: float = 2.0
    """How long the dispatcher waits to fill a micro-batch before sending it part-full."""
    edge_timeout_s: float = 60.0
    """Timeout of each edge's process group."""

    @property
    def stage_count(self) -> int:
        """Number of stages, from `layers` if given, else `stages`."""
        if self.layers is not None:
            return len(self.layers)
        assert self.stages is not None, "a loaded PipelineConfig has stages or layers"
        return self.stages

    @property
    def replica_total(self) -> int:
        """Stage replicas in the whole pipeline (= worker processes)."""
        return sum(self.replicas)


@dataclass(frozen=True)
class PlacementConfig:
    """[placement]: where each stage replica runs."""

    devices: tuple[str, ...] | str = AUTO_DEVICES
    """"auto", or one of "cpu" / "cuda" / "cuda:N" per stage replica in stage-major order."""
    host: str = "127.0.0.1"
    """Address workers bind their edges to on this host."""
    policy: str = "pack"
    """How the controller spreads stage replicas over agents; one of PLACEMENT_POLICIES (`infscaled run` ignores it)."""
    agents: tuple[str, ...] = ()
    """One agent id per stage replica in stage-major order; given iff policy is "static"."""


@dataclass(frozen=True)
class WorkloadConfig:
    """[workload]: the requests a run sends."""

    requests: int = 100
    """Requests to send in total."""
    rate: float = 0.0
    """Poisson arrival rate in requests/s; 0 = closed loop."""
    concurrency: int = 0
    """Closed loop only: requests outstanding at once; 0 = chosen automatically."""
    samples: tuple[int, int] = (1, 1)
    """(min, max) samples per request, drawn uniformly; max <= pipeline.micro_batch_size."""
    seq_len: tuple[int, int] = (16, 16)
    """(min, max) tokens per sample, for token models."""
    image_size: int = 0
    """Image side in pixels, for image models; 0 = the model's default."""
    seed: int = 0
    """Seed for generated request inputs and arrival times."""
    input_file: str | None = None
    """Absolute path of a .safetensors file of request inputs, or None to generate them."""
    request_timeout_s: float = 120.0
    """How long one request may take end to end before it fails."""


@dataclass(frozen=True)
class GenerationConfig:
    """[generation]: serve a decoder LLM's text generation (KV caches in the stages)."""

    kv_budget_tokens: int = 8192
    """KV-cache positions each stage replica may hold; a sequence reserves prompt + max_new_tokens."""
    max_batch_sequences: int = 16
    """Most sequences in one micro-batch (prefill or decode step)."""
    micro_batches_in_flight: int = 0
    """Decode micro-batches kept in flight per replica chain; 0 = one per stage."""
    prefill_chunk_tokens: int = 512
    """Most prompt tokens in one prefill micro-batch: a longer prompt is prefilled in chunks, one
    between decode steps, so an arrival delays running sequences by at most one chunk; 0 = whole
    prompts (each arrival's prefill runs at once, however long)."""
    max_new_tokens: int = 16
    """Default when a request does not say."""
    warmup_s: float = GenerationPlan.warmup_s  # 30 s: one default for job files and plans
    """Seconds a CUDA stage may spend before READY running and capturing its decode buckets; 0 = none."""
    prompt_tokens: tuple[int, int] = (8, 32)
    """`infscaled run` workload: (min, max) prompt length in tokens, drawn uniformly."""
    output_tokens: tuple[int, int] = (8, 32)
    """`infscaled run` workload: (min, max) new tokens per request, drawn uniformly."""


@dataclass(frozen=True)
class JobConfig:
    """A whole job file."""

    name: str
    """Job name; defaults to the file's stem."""
    path: str
    """The file it was loaded from, as given; "<string>" when parsed from data."""
    base_dir: str
    """Absolute directory that relative paths in the file were resolved against."""
    model: ModelConfig
    """[model] table."""
    pipeline: PipelineConfig
    """[pipeline] table."""
    placement: PlacementConfig
    """[placement] table."""
    workload: WorkloadConfig
    """[workload] table."""
    generation: GenerationConfig | None = None
    """[generation] table; None: a forward-only job (one result per request)."""
    recovery: RecoveryConfig = RecoveryConfig()
    """[recovery] table (protocol.plan.Recovery: the plan carries it to every supervisor)."""

    @property
    def stage_count(self) -> int:
        """Number of pipeline stages."""
        return self.pipeline.stage_count
