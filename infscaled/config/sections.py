"""Parsers for each table of a job file; each reads one `Section` and returns its dataclass."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from infscaled.config.limits import (
    MAX_EDGES,
    MAX_REPLICAS_PER_STAGE,
    MAX_STAGES,
    MAX_WARMUP_S,
    MAX_WORKERS,
    mesh_edge_count,
)
from infscaled.config.messages import MISSING, config_error
from infscaled.config.ranges import UnitRange, layers_allowed, range_problem
from infscaled.config.schema import (
    AUTO_DEVICES,
    DTYPES,
    GRAPHS,
    PLACEMENT_POLICIES,
    POLICIES,
    GenerationConfig,
    ModelConfig,
    PipelineConfig,
    PlacementConfig,
    RecoveryConfig,
    WorkloadConfig,
)
from infscaled.config.source import SOURCE_FORMS, resolve_source, roots_problem, under_roots
from infscaled.config.topology import check_topology
from infscaled.config.values import Section, check_int, check_list, check_str


def field_names(cls: type) -> tuple[str, ...]:
    """The TOML keys of a table: its dataclass's fields, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls))


def parse_model(sec: Section, base_dir: Path, roots: Sequence[str] | None = None) -> ModelConfig:
    """[model]; `roots`: see config.source.resolve_source."""
    sec.check_keys(field_names(ModelConfig))
    source = sec.get_str("source", None, SOURCE_FORMS)
    return ModelConfig(
        source=resolve_source(sec.path, source, base_dir, roots),
        dtype=sec.get_choice("dtype", ModelConfig.dtype, DTYPES, "dtype"),
        seed=sec.get_int("seed", ModelConfig.seed, lo=0),
    )


def _parse_layers(sec: Section) -> tuple[UnitRange, ...]:
    raw = sec.raw("layers")
    items = check_list(sec.path, sec.key("layers"), raw, layers_allowed())
    if not items:
        raise sec.error("layers", raw, layers_allowed(), "needs at least one range")
    if len(items) > MAX_STAGES:
        raise sec.error("layers", f"<{len(items)} ranges>", f"at most {MAX_STAGES} stages", "too many stages")
    ranges: list[UnitRange] = []
    for i, pair in enumerate(items):
        key = f"layers[{i}]"
        ints = isinstance(pair, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
        if not ints or len(pair) != 2:
            raise sec.error(key, pair, layers_allowed(), "expected a [first, last] pair of integers")
        first, last = pair
        if first < 0 or first > last:
            raise sec.error(key, pair, layers_allowed(), "needs 0 <= first <= last")
        ranges.append((first, last))
    problem = range_problem(ranges)
    if problem is not None:
        raise sec.error("layers", raw, layers_allowed(), problem)
    return tuple(ranges)


def _parse_replicas(sec: Section, stage_count: int) -> tuple[int, ...]:
    raw = sec.raw("replicas")
    allowed = f"one replica count (1..{MAX_REPLICAS_PER_STAGE}) per stage: {stage_count} entries"
    if raw is MISSING:
        return (1,) * stage_count
    items = check_list(sec.path, sec.key("replicas"), raw, allowed)
    if len(items) != stage_count:
        shown = raw if len(items) <= 16 else f"<{len(items)} entries>"
        raise sec.error("replicas", shown, allowed, f"{len(items)} entries for {stage_count} stages")
    replicas = tuple(check_int(sec.path, sec.key(f"replicas[{i}]"), v, lo=1, hi=MAX_REPLICAS_PER_STAGE)
                     for i, v in enumerate(items))
    if sum(replicas) > MAX_WORKERS:
        raise sec.error("replicas", raw, f"at most {MAX_WORKERS} stage replicas in one job",
                        f"{sum(replicas)} stage replicas")
    if sec.raw("graph") in (MISSING, "mesh") and mesh_edge_count(replicas) > MAX_EDGES:
        raise sec.error("replicas", raw, f"at most {MAX_EDGES} edges in one job (a mesh connects every replica "
                        "of a stage to every replica of the next)", f"{mesh_edge_count(replicas)} mesh edges; "
                        "use graph = 'parallel' or 'explicit', or fewer replicas")
    return replicas


def parse_pipeline(sec: Section) -> PipelineConfig:
    """[pipeline]."""
    sec.check_keys(field_names(PipelineConfig))
    exactly_one = (
        "exactly one of pipeline.stages (a stage count, balanced by parameter count) "
        "or pipeline.layers (unit ranges per stage)"
    )
    if sec.has("stages") and sec.has("layers"):
        raise sec.error(
            "stages",
            sec.raw("stages"),
            exactly_one,
            f"conflicts with pipeline.layers = {sec.raw('layers')!r}",
        )
    if not sec.has("stages") and not sec.has("layers"):
        raise sec.error("stages", MISSING, exactly_one, "neither pipeline.stages nor pipeline.layers is set")
    stages = sec.get_int("stages", 0, lo=1, hi=MAX_STAGES) if sec.has("stages") else None
    layers = _parse_layers(sec) if sec.has("layers") else None
    stage_count = len(layers) if layers is not None else stages
    assert stage_count is not None
    replicas = _parse_replicas(sec, stage_count)
    graph = sec.get_choice("graph", PipelineConfig.graph, GRAPHS, "graph")
    return PipelineConfig(
        stages=stages,
        layers=layers,
        replicas=replicas,
        graph=graph,
        edges=check_topology(sec, graph, replicas),
        policy=sec.get_choice("policy", PipelineConfig.policy, POLICIES, "policy"),
        micro_batch_size=sec.get_int("micro_batch_size", PipelineConfig.micro_batch_size, 1, 4096),
        max_inflight=sec.get_int("max_inflight", PipelineConfig.max_inflight, 1, 1024),
        cuda_graphs=sec.get_bool("cuda_graphs", PipelineConfig.cuda_graphs),
        compile=sec.get_bool("compile", PipelineConfig.compile),
        max_wait_ms=sec.get_float("max_wait_ms", PipelineConfig.max_wait_ms, 0.0, 60000.0),
        edge_timeout_s=sec.get_float("edge_timeout_s", PipelineConfig.edge_timeout_s, 0.0, lo_open=True),
    )


_DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+)$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*$")


def _device_order(replicas: tuple[int, ...]) -> str:
    nodes = [f"{s}.{r}" for s, count in enumerate(replicas) for r in range(count)]
    return ", ".join(nodes)


def parse_placement(sec: Section, replicas: tuple[int, ...]) -> PlacementConfig:
    """[placement]; `replicas` (from [pipeline]) fixes how many devices are needed."""
    sec.check_keys(field_names(PlacementConfig))
    raw: Any = sec.raw("devices")
    allowed = (
        f"'auto', or a list of {sum(replicas)} devices ('cpu', 'cuda', 'cuda:N'), one per stage "
        f"replica in stage-major order: {_device_order(replicas)}"
    )
    devices: tuple[str, ...] | str = AUTO_DEVICES
    if isinstance(raw, str):
        if raw != AUTO_DEVICES:
            raise sec.error("devices", raw, allowed, "the only string allowed is 'auto'")
    elif raw is not MISSING:
        items = check_list(sec.path, sec.key("devices"), raw, allowed)
        for i, device in enumerate(items):
            if not isinstance(device, str) or not _DEVICE.match(device):
                raise sec.error(f"devices[{i}]", device, "'cpu', 'cuda' or 'cuda:N'", "not a device")
        if len(items) != sum(replicas):
            raise sec.error(
                "devices",
                raw,
                allowed,
                f"{len(items)} device(s) for {sum(replicas)} stage replica(s) (replicas = {list(replicas)})",
            )
        devices = tuple(items)
    host_allowed = "an IP address or a host name, e.g. '127.0.0.1' or 'node3.cluster'"
    host = sec.get_str("host", PlacementConfig.host, host_allowed)
    if not _is_ip(host) and not _HOSTNAME.match(host):
        raise sec.error("host", host, host_allowed, "not an IP address or host name")
    policy = sec.get_choice("policy", PlacementConfig.policy, PLACEMENT_POLICIES, "placement policy")
    return PlacementConfig(devices=devices, host=host, policy=policy, agents=_parse_agents(sec, policy, replicas))


def _parse_agents(sec: Section, policy: str, replicas: tuple[int, ...]) -> tuple[str, ...]:
    """`placement.agents`: one agent id per stage replica, required exactly when policy = "static"."""
    raw: Any = sec.raw("agents")
    if policy != "static":
        if raw is not MISSING:
            raise sec.error(
                "agents",
                raw,
                "no agents unless placement.policy = 'static'",
                f"agents are only used with policy = 'static' (policy is {policy!r})",
            )
        return ()
    allowed = (
        f"a list of {sum(replicas)} agent ids, one per stage replica in stage-major order: "
        f"{_device_order(replicas)}"
    )
    if raw is MISSING:
        raise sec.error("agents", MISSING, allowed, "placement.policy = 'static' needs agents")
    items = check_list(sec.path, sec.key("agents"), raw, allowed)
    agents = tuple(check_str(sec.path, sec.key(f"agents[{i}]"), v, "an agent id") for i, v in enumerate(items))
    if len(agents) != sum(replicas):
        raise sec.error(
            "agents",
            raw,
            allowed,
            f"{len(agents)} agent(s) for {sum(replicas)} stage replica(s) (replicas = {list(replicas)})",
        )
    return agents


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _parse_min_max(sec: Section, name: str, default: tuple[int, int], limit: str = "") -> tuple[int, int]:
    """An int n (= [n, n]) or a [min, max] pair with 1 <= min <= max (<= `limit` when given)."""
    raw = sec.raw(name)
    bound = f" <= {limit}" if limit else ""
    allowed = f"an integer n (meaning [n, n]) or [min, max] with 1 <= min <= max{bound}"
    if raw is MISSING:
        return default
    if isinstance(raw, int) and not isinstance(raw, bool):
        low = high = raw
    elif (
        isinstance(raw, list)
        and len(raw) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in raw)
    ):
        low, high = raw
    else:
        raise sec.error(name, raw, allowed, "expected an integer or a [min, max] pair of integers")
    if not 1 <= low <= high:
        raise sec.error(name, raw, allowed, "needs 1 <= min <= max")
    return low, high


def parse_workload(sec: Section, micro_batch_size: int, base_dir: Path,
                   roots: Sequence[str] | None = None) -> WorkloadConfig:
    """[workload]; a request's samples must fit `micro_batch_size` (from [pipeline])."""
    sec.check_keys(field_names(WorkloadConfig))
    rate = sec.get_float("rate", WorkloadConfig.rate, lo=0.0)
    concurrency = sec.get_int("concurrency", WorkloadConfig.concurrency, lo=0)
    if rate > 0 and concurrency > 0:
        raise sec.error(
            "concurrency",
            concurrency,
            "0 (or leave it out) when workload.rate > 0",
            f"only applies to closed loop (rate = 0), but workload.rate = {rate:g}",
        )
    limit = f"pipeline.micro_batch_size ({micro_batch_size})"
    samples = _parse_min_max(sec, "samples", WorkloadConfig.samples, limit)
    if samples[1] > micro_batch_size:
        raise sec.error(
            "samples",
            sec.raw("samples"),
            f"an integer n or [min, max] with 1 <= min <= max <= {limit}",
            f"a request must fit in one micro-batch, but {samples[1]} samples exceed "
            f"pipeline.micro_batch_size = {micro_batch_size}",
        )
    return WorkloadConfig(
        requests=sec.get_int("requests", WorkloadConfig.requests, lo=1),
        rate=rate,
        concurrency=concurrency,
        samples=samples,
        seq_len=_parse_min_max(sec, "seq_len", WorkloadConfig.seq_len),
        image_size=sec.get_int("image_size", WorkloadConfig.image_size, lo=0),
        seed=sec.get_int("seed", WorkloadConfig.seed, lo=0),
        input_file=_parse_input_file(sec, base_dir, roots),
        request_timeout_s=sec.get_float(
            "request_timeout_s", WorkloadConfig.request_timeout_s, 0.0, lo_open=True
        ),
    )


def parse_generation(sec: Section, pipeline: PipelineConfig) -> GenerationConfig:
    """[generation]; a sequence sticks to one replica chain, so every stage has the same replica
    count and the graph is "parallel" (chain r = replica r of every stage)."""
    sec.check_keys(field_names(GenerationConfig))
    replicas = pipeline.replicas
    if len(set(replicas)) != 1 or (replicas[0] > 1 and len(replicas) > 1 and pipeline.graph != "parallel"):
        raise config_error(sec.path, "pipeline.replicas", list(replicas),
                           "the same replica count for every stage, with pipeline.graph = \"parallel\"",
                           f"[generation] needs replica chains (a sequence stays on replica r of every stage), "
                           f"but pipeline.graph = {pipeline.graph!r}")
    return GenerationConfig(
        kv_budget_tokens=sec.get_int("kv_budget_tokens", GenerationConfig.kv_budget_tokens, lo=1),
        max_batch_sequences=sec.get_int("max_batch_sequences", GenerationConfig.max_batch_sequences, lo=1),
        micro_batches_in_flight=sec.get_int("micro_batches_in_flight", GenerationConfig.micro_batches_in_flight,
                                            lo=0),
        prefill_chunk_tokens=sec.get_int("prefill_chunk_tokens", GenerationConfig.prefill_chunk_tokens, lo=0),
        max_new_tokens=sec.get_int("max_new_tokens", GenerationConfig.max_new_tokens, lo=1),
        warmup_s=sec.get_float("warmup_s", GenerationConfig.warmup_s, lo=0.0, hi=MAX_WARMUP_S),
        prompt_tokens=_parse_min_max(sec, "prompt_tokens", GenerationConfig.prompt_tokens),
        output_tokens=_parse_min_max(sec, "output_tokens", GenerationConfig.output_tokens),
    )


def _parse_input_file(sec: Section, base_dir: Path, roots: Sequence[str] | None) -> str | None:
    allowed = "an existing .safetensors file (relative paths are resolved against the job file's directory)"
    if not sec.has("input_file"):
        return None
    value = check_str(sec.path, sec.key("input_file"), sec.raw("input_file"), allowed)
    if roots is not None and not under_roots(base_dir / Path(value).expanduser(), roots):
        raise sec.error("input_file", value, allowed, roots_problem(roots).replace("model directories", "files"))
    resolved = (base_dir / Path(value).expanduser()).resolve()
    if resolved.suffix != ".safetensors":
        raise sec.error("input_file", value, allowed, "not a .safetensors file")
    if not resolved.is_file():
        raise sec.error("input_file", value, allowed, f"no such file (resolved to {resolved})")
    return str(resolved)


def parse_recovery(sec: Section) -> RecoveryConfig:
    """[recovery]."""
    sec.check_keys(field_names(RecoveryConfig))
    return RecoveryConfig(
        enabled=sec.get_bool("enabled", RecoveryConfig.enabled),
        attempts=sec.get_int("attempts", RecoveryConfig.attempts, lo=0, hi=100),
        backoff_s=sec.get_float("backoff_s", RecoveryConfig.backoff_s, lo=0.0, hi=300.0),
        heartbeat_timeout_s=sec.get_float("heartbeat_timeout_s", RecoveryConfig.heartbeat_timeout_s, lo=0.5,
                                          hi=600.0),
    )
