"""Job-file loading: a valid file, defaults, and one test per kind of bad input.

Every error test checks the one message shape: file name, dotted key, repr of the bad value
and the "allowed" part.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from infscaled.config import (
    ConfigError,
    JobConfig,
    ModelConfig,
    PipelineConfig,
    PlacementConfig,
    WorkloadConfig,
    check_against_model,
    check_builtin,
    format_error,
    load_job,
    parse_job,
)

MINIMAL = """
[model]
source = "builtin:tiny-gpt"

[pipeline]
stages = 2
"""


def write(tmp_path: Path, text: str, name: str = "bad.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_error(tmp_path: Path, text: str) -> str:
    """Load `text` as bad.toml and return the ConfigError message (fails if none is raised)."""
    with pytest.raises(ConfigError) as info:
        load_job(write(tmp_path, text))
    message = str(info.value)
    assert "bad.toml" in message
    assert "; allowed: " in message
    return message


def assert_parts(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def with_pipeline(pipeline: str, extra: str = "") -> str:
    return f'[model]\nsource = "builtin:tiny-gpt"\n\n[pipeline]\n{pipeline}\n{extra}'


# --- valid files -----------------------------------------------------------------------------


def test_full_file_parses_to_dataclasses(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "inputs.safetensors").write_bytes(b"")
    path = write(
        tmp_path,
        """
name = "demo"

[model]
source = "./weights"
dtype = "bfloat16"
seed = 7

[pipeline]
layers = [[0, 3], [4, 11]]
replicas = [1, 2]
graph = "explicit"
edges = [["0.0", "1.0"], ["0.0", "1.1"]]
policy = "shortest_queue"
micro_batch_size = 16
max_inflight = 8
max_wait_ms = 5
edge_timeout_s = 30.0

[placement]
devices = ["cuda:0", "cuda:1", "cuda"]
host = "10.0.0.2"

[workload]
requests = 50
rate = 20.5
samples = [2, 16]
seq_len = 32
image_size = 224
seed = 3
input_file = "inputs.safetensors"
request_timeout_s = 10
""",
        name="full.toml",
    )
    cfg = load_job(path)
    base = tmp_path.resolve()
    assert cfg == JobConfig(
        name="demo",
        path=str(path),
        base_dir=str(base),
        model=ModelConfig(source=str(base / "weights"), dtype="bfloat16", seed=7),
        pipeline=PipelineConfig(
            stages=None,
            layers=((0, 3), (4, 11)),
            replicas=(1, 2),
            graph="explicit",
            edges=(("0.0", "1.0"), ("0.0", "1.1")),
            policy="shortest_queue",
            micro_batch_size=16,
            max_inflight=8,
            max_wait_ms=5.0,
            edge_timeout_s=30.0,
        ),
        placement=PlacementConfig(devices=("cuda:0", "cuda:1", "cuda"), host="10.0.0.2"),
        workload=WorkloadConfig(
            requests=50,
            rate=20.5,
            concurrency=0,
            samples=(2, 16),
            seq_len=(32, 32),
            image_size=224,
            seed=3,
            input_file=str(base / "inputs.safetensors"),
            request_timeout_s=10.0,
        ),
    )
    assert cfg.stage_count == 2
    assert isinstance(cfg.pipeline.max_wait_ms, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "other"  # type: ignore[misc]


def test_defaults(tmp_path: Path) -> None:
    cfg = load_job(write(tmp_path, MINIMAL, name="quick.toml"))
    assert cfg.name == "quick"
    assert cfg.base_dir == str(tmp_path.resolve())
    assert cfg.model == ModelConfig(source="builtin:tiny-gpt")
    assert cfg.pipeline == PipelineConfig(stages=2, replicas=(1, 1))
    assert cfg.placement == PlacementConfig()
    assert cfg.placement.devices == "auto"
    assert cfg.workload == WorkloadConfig()
    assert cfg.stage_count == 2


def test_replicas_default_from_layers() -> None:
    cfg = parse_job({"model": {"source": "builtin:x"}, "pipeline": {"layers": [[0, 1], [2, 2], [3, 5]]}})
    assert cfg.pipeline.replicas == (1, 1, 1)
    assert cfg.stage_count == 3
    assert cfg.path == "<string>"
    assert cfg.name == "job"


def test_source_forms(tmp_path: Path) -> None:
    (tmp_path / "local-model").mkdir()
    forms = {
        "python:my_pkg.models:build_model": "python:my_pkg.models:build_model",
        "openai-community/gpt2": "openai-community/gpt2",
        "gpt2": "gpt2",
        "local-model": str(tmp_path.resolve() / "local-model"),  # existing relative path
    }
    for source, expected in forms.items():
        cfg = parse_job({"model": {"source": source}, "pipeline": {"stages": 1}}, base_dir=tmp_path)
        assert cfg.model.source == expected


def test_parallel_and_scalar_samples() -> None:
    cfg = parse_job(
        {
            "model": {"source": "builtin:x"},
            "pipeline": {"stages": 2, "replicas": [2, 2], "graph": "parallel"},
            "workload": {"samples": 8, "seq_len": [4, 64]},
        }
    )
    assert cfg.workload.samples == (8, 8)
    assert cfg.workload.seq_len == (4, 64)


def test_check_against_model_accepts_exact_cover(tmp_path: Path) -> None:
    cfg = load_job(write(tmp_path, with_pipeline("layers = [[0, 3], [4, 11]]")))
    assert check_against_model(cfg, 12) is cfg
    cfg = load_job(write(tmp_path, MINIMAL))
    assert check_against_model(cfg, 2) is cfg


def test_format_error_shape() -> None:
    assert (
        format_error("bad.toml", "pipeline.policy", "fastest", "a, b", problem="unknown policy")
        == "bad.toml: pipeline.policy = 'fastest': unknown policy; allowed: a, b"
    )


def test_config_package_stays_light() -> None:
    # The controller imports this package; torch/transformers must never come with it.
    package = Path(__file__).resolve().parents[1] / "infscaled" / "config"
    for module in package.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in {"torch", "transformers"}, module


# --- file-level errors -----------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_job(tmp_path / "nope.toml")
    assert_parts(str(info.value), "nope.toml", "no such file", "allowed: ")


def test_invalid_toml(tmp_path: Path) -> None:
    message = load_error(tmp_path, "[model]\nsource = \n")
    assert_parts(message, "invalid TOML", "line 2")


def test_unknown_top_level_table(tmp_path: Path) -> None:
    message = load_error(tmp_path, MINIMAL + "\n[pipline]\nreplicas = [1, 1]\n")
    assert_parts(message, "pipline = {'replicas': [1, 1]}", "unknown key", "did you mean 'pipeline'?")
    assert_parts(message, "allowed: name, model, pipeline, placement, workload")


def test_unknown_nested_key(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2\nreplica = [1, 1]"))
    assert_parts(message, "pipeline.replica = [1, 1]", "did you mean 'replicas'?", "allowed: stages, layers")


def test_wrong_type(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline('stages = "two"'))
    assert_parts(message, "pipeline.stages = 'two'", "expected an integer", "allowed: an integer in 1..512")


def test_bool_is_not_an_integer(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2\nmicro_batch_size = true"))
    assert_parts(message, "pipeline.micro_batch_size = True", "expected an integer", "1..4096")


def test_cuda_graphs_is_a_boolean(tmp_path: Path) -> None:
    on = load_job(write(tmp_path, with_pipeline("stages = 2"), "on.toml"))
    off = load_job(write(tmp_path, with_pipeline("stages = 2\ncuda_graphs = false"), "off.toml"))
    assert on.pipeline.cuda_graphs is True and off.pipeline.cuda_graphs is False
    for raw, shown in (('"false"', "'false'"), ("0", "0")):
        message = load_error(tmp_path, with_pipeline(f"stages = 2\ncuda_graphs = {raw}"))
        assert_parts(message, f"pipeline.cuda_graphs = {shown}", "expected a boolean",
                     "allowed: true or false (TOML booleans, unquoted)")


def test_section_not_a_table(tmp_path: Path) -> None:
    message = load_error(tmp_path, 'pipeline = 3\n[model]\nsource = "builtin:x"\n')
    assert_parts(message, "pipeline = 3", "expected a table", "allowed: a table: [pipeline]")


def test_missing_model_source(tmp_path: Path) -> None:
    message = load_error(tmp_path, "[model]\ndtype = 'float16'\n[pipeline]\nstages = 1\n")
    assert_parts(message, "model.source", "missing required key", "builtin:NAME")


# --- [model] ---------------------------------------------------------------------------------


def test_unknown_dtype(tmp_path: Path) -> None:
    message = load_error(tmp_path, MINIMAL.replace("[pipeline]", 'dtype = "fp8"\n\n[pipeline]'))
    assert_parts(message, "model.dtype = 'fp8'", "unknown dtype", "allowed: float32, bfloat16, float16")


def test_missing_model_directory(tmp_path: Path) -> None:
    message = load_error(tmp_path, MINIMAL.replace("builtin:tiny-gpt", "./nope"))
    resolved = tmp_path.resolve() / "nope"
    assert_parts(message, "model.source = './nope'", f"no such model directory (resolved to {resolved})")
    assert_parts(message, "allowed: 'builtin:NAME'")


def test_model_source_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"")
    message = load_error(tmp_path, MINIMAL.replace("builtin:tiny-gpt", "./model.bin"))
    assert_parts(message, "model.source = './model.bin'", "not a directory", "allowed: ")


@pytest.mark.parametrize("source", ["python:mod", "python:my-mod:build", "python:mod:", "python:a.b:1x"])
def test_bad_python_source(tmp_path: Path, source: str) -> None:
    message = load_error(tmp_path, MINIMAL.replace("builtin:tiny-gpt", source))
    assert_parts(message, f"model.source = {source!r}", "malformed python: source", "'python:MODULE:FACTORY'")


def test_empty_builtin_name(tmp_path: Path) -> None:
    message = load_error(tmp_path, MINIMAL.replace("builtin:tiny-gpt", "builtin:"))
    assert_parts(message, "model.source = 'builtin:'", "builtin model name", "allowed: 'builtin:NAME'")


def test_bad_hf_id(tmp_path: Path) -> None:
    message = load_error(tmp_path, MINIMAL.replace("builtin:tiny-gpt", "https://x.org/m"))
    assert_parts(message, "model.source = 'https://x.org/m'", "Hugging Face id", "allowed: ")


def test_unknown_builtin(tmp_path: Path) -> None:
    cfg = load_job(write(tmp_path, MINIMAL.replace("tiny-gpt", "gpt9")))
    check_builtin(load_job(write(tmp_path, MINIMAL, "ok.toml")), ["tiny-gpt", "tiny-vit"])
    with pytest.raises(ConfigError) as info:
        check_builtin(cfg, ["tiny-gpt", "tiny-vit"])
    assert_parts(
        str(info.value),
        "bad.toml",
        "model.source = 'builtin:gpt9'",
        "unknown builtin model",
        "allowed: builtin:tiny-gpt, builtin:tiny-vit",
    )


# --- [pipeline]: stages and layers -----------------------------------------------------------


def test_neither_stages_nor_layers(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("policy = 'random'"))
    assert_parts(message, "pipeline.stages", "neither", "allowed: exactly one of pipeline.stages")


def test_both_stages_and_layers(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2\nlayers = [[0, 1], [2, 3]]"))
    assert_parts(message, "pipeline.stages = 2", "conflicts with pipeline.layers = [[0, 1], [2, 3]]")
    assert_parts(message, "allowed: exactly one of")


def test_stages_below_one(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 0"))
    assert_parts(message, "pipeline.stages = 0", "out of range", "allowed: an integer in 1..512")


def test_layers_gap(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("layers = [[0, 3], [5, 11]]"))
    assert_parts(
        message,
        "pipeline.layers = [[0, 3], [5, 11]]",
        "units 4..4 are in no stage",
        "allowed: [first",
    )


def test_layers_overlap(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("layers = [[0, 4], [3, 11]]"))
    assert_parts(message, "pipeline.layers = [[0, 4], [3, 11]]", "units 3..4 are in two stages", "allowed: ")


def test_layers_not_starting_at_zero(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("layers = [[2, 5], [6, 11]]"))
    assert_parts(message, "pipeline.layers = [[2, 5], [6, 11]]", "units 0..1 are in no stage", "allowed: ")


def test_layers_descending(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("layers = [[4, 11], [0, 3]]"))
    assert_parts(message, "pipeline.layers = [[4, 11], [0, 3]]", "ascending order", "allowed: ")


@pytest.mark.parametrize(
    ("pair", "problem"),
    [
        ("[3, 1]", "0 <= first <= last"),
        ("[0, 1, 2]", "[first, last] pair"),
        ('["a", 1]', "[first, last] pair"),
    ],
)
def test_layers_bad_pair(tmp_path: Path, pair: str, problem: str) -> None:
    message = load_error(tmp_path, with_pipeline(f"layers = [{pair}]"))
    shown = repr(ast.literal_eval(pair))
    assert_parts(message, f"pipeline.layers[0] = {shown}", problem, "allowed: ")


def test_layers_drop_units_at_end(tmp_path: Path) -> None:
    cfg = load_job(write(tmp_path, with_pipeline("layers = [[0, 3], [4, 9]]")))
    with pytest.raises(ConfigError) as info:
        check_against_model(cfg, 12)
    assert_parts(
        str(info.value),
        "bad.toml",
        "pipeline.layers = [[0, 3], [4, 9]]",
        "units 10..11 are in no stage",
        "allowed: [first, last] ranges",
        "cover units 0..11",
    )


def test_layers_exceed_model(tmp_path: Path) -> None:
    cfg = load_job(write(tmp_path, with_pipeline("layers = [[0, 3], [4, 14]]")))
    with pytest.raises(ConfigError) as info:
        check_against_model(cfg, 12)
    assert_parts(
        str(info.value),
        "bad.toml",
        "pipeline.layers = [[0, 3], [4, 14]]",
        "unit 14 does not exist; the model has 12 units, 0..11",
        "allowed: ",
    )


def test_more_stages_than_units(tmp_path: Path) -> None:
    cfg = load_job(write(tmp_path, with_pipeline("stages = 20")))
    with pytest.raises(ConfigError) as info:
        check_against_model(cfg, 12)
    assert_parts(
        str(info.value),
        "bad.toml",
        "pipeline.stages = 20",
        "more stages than the model has units (12)",
        "allowed: 1..12",
    )


# --- [pipeline]: replicas, graph, edges, policy, limits --------------------------------------


def test_replicas_wrong_length(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2\nreplicas = [1, 2, 3]"))
    assert_parts(
        message,
        "pipeline.replicas = [1, 2, 3]",
        "3 entries for 2 stages",
        "allowed: one replica count",
    )


def test_replicas_below_one(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2\nreplicas = [1, 0]"))
    assert_parts(message, "pipeline.replicas[1] = 0", "out of range", "allowed: an integer in 1..1024")


def test_unknown_policy(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2\npolicy = 'fastest'"))
    assert message.endswith(
        "bad.toml: pipeline.policy = 'fastest': unknown policy; "
        "allowed: round_robin, random, shortest_queue, static, weighted"
    )


def test_unknown_graph(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2\ngraph = 'ring'"))
    assert_parts(message, "pipeline.graph = 'ring'", "unknown graph", "allowed: mesh, parallel, explicit")


def test_micro_batch_size_out_of_range(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2\nmicro_batch_size = 5000"))
    assert_parts(
        message,
        "pipeline.micro_batch_size = 5000",
        "out of range",
        "allowed: an integer in 1..4096",
    )


def test_edge_timeout_must_be_positive(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2\nedge_timeout_s = 0"))
    assert_parts(message, "pipeline.edge_timeout_s = 0", "out of range", "allowed: a number > 0")


def test_parallel_unequal_replicas(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2\nreplicas = [1, 2]\ngraph = 'parallel'"))
    assert_parts(message, "pipeline.graph = 'parallel'", "replicas = [1, 2]", "allowed: ")


def test_edges_without_explicit_graph(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2\nedges = [['0.0', '1.0']]"))
    assert_parts(
        message,
        "pipeline.edges = [['0.0', '1.0']]",
        "only used with graph = 'explicit'",
        "allowed: ",
    )


def test_explicit_without_edges(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2\ngraph = 'explicit'\nedges = []"))
    assert_parts(message, "pipeline.edges = []", "needs at least one edge", "allowed: ")


def test_explicit_unknown_node(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2\ngraph = 'explicit'\nedges = [['0.0', '1.3']]"))
    assert_parts(message, "pipeline.edges[0] = ['0.0', '1.3']", "node 1.3 does not exist", "replicas [1, 1]")
    assert_parts(message, "allowed: ")


def test_explicit_bad_node_name(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2\ngraph = 'explicit'\nedges = [['0.0', 'one']]"))
    assert_parts(message, "pipeline.edges[0] = ['0.0', 'one']", "'one' is not a node name", "allowed: ")


def test_explicit_non_consecutive_stages(tmp_path: Path) -> None:
    text = with_pipeline(
        "stages = 3\ngraph = 'explicit'\nedges = [['0.0', '1.0'], ['1.0', '2.0'], ['0.0', '2.0']]",
    )
    message = load_error(tmp_path, text)
    assert_parts(
        message,
        "pipeline.edges[2] = ['0.0', '2.0']",
        "from stage i to stage i+1",
        "0 -> 2",
        "allowed: ",
    )


def test_explicit_stranded_replica(tmp_path: Path) -> None:
    text = with_pipeline("stages = 2\nreplicas = [2, 1]\ngraph = 'explicit'\nedges = [['0.0', '1.0']]")
    message = load_error(tmp_path, text)
    assert_parts(
        message,
        "pipeline.edges = [['0.0', '1.0']]",
        "replica 0.1 has no outgoing edge",
        "allowed: ",
    )


def test_explicit_replica_without_input(tmp_path: Path) -> None:
    text = with_pipeline("stages = 2\nreplicas = [1, 2]\ngraph = 'explicit'\nedges = [['0.0', '1.0']]")
    message = load_error(tmp_path, text)
    assert_parts(message, "replica 1.1 has no incoming edge")


# --- [placement] -----------------------------------------------------------------------------


def test_devices_wrong_length(tmp_path: Path) -> None:
    message = load_error(
        tmp_path, with_pipeline("stages = 2\nreplicas = [1, 2]", '[placement]\ndevices = ["cpu", "cpu"]')
    )
    assert_parts(
        message,
        "placement.devices = ['cpu', 'cpu']",
        "2 device(s) for 3 stage replica(s)",
        "stage-major order: 0.0, 1.0, 1.1",
    )


def test_bad_device_string(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2", '[placement]\ndevices = ["cpu", "gpu:1"]'))
    assert_parts(
        message,
        "placement.devices[1] = 'gpu:1'",
        "not a device",
        "allowed: 'cpu', 'cuda' or 'cuda:N'",
    )


def test_devices_string_other_than_auto(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2", '[placement]\ndevices = "cuda"'))
    assert_parts(message, "placement.devices = 'cuda'", "only string allowed is 'auto'", "allowed: 'auto'")


def test_bad_host(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2", '[placement]\nhost = "not a host"'))
    assert_parts(message, "placement.host = 'not a host'", "allowed: an IP address or a host name")


def test_placement_policy_and_static_agents(tmp_path: Path) -> None:
    cfg = load_job(write(tmp_path, with_pipeline(
        "stages = 2\nreplicas = [1, 2]", '[placement]\npolicy = "static"\nagents = ["a", "b", "b"]'
    )))
    assert cfg.placement.policy == "static"
    assert cfg.placement.agents == ("a", "b", "b")
    assert load_job(write(tmp_path, MINIMAL, name="ok.toml")).placement.policy == "pack"


def test_unknown_placement_policy(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2", '[placement]\npolicy = "spraed"'))
    assert_parts(
        message, "placement.policy = 'spraed'", "unknown placement policy (did you mean 'spread'?)",
        "allowed: pack, spread, static",
    )


def test_static_placement_needs_agents(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2", '[placement]\npolicy = "static"'))
    assert_parts(message, "placement.agents:", "needs agents", "allowed: a list of 2 agent ids", "0.0, 1.0")


def test_static_agents_count_and_type(tmp_path: Path) -> None:
    text = with_pipeline("stages = 2\nreplicas = [1, 2]", '[placement]\npolicy = "static"\nagents = ["a", "b"]')
    message = load_error(tmp_path, text)
    assert_parts(message, "placement.agents = ['a', 'b']", "2 agent(s) for 3 stage replica(s)", "0.0, 1.0, 1.1")
    message = load_error(tmp_path, with_pipeline("stages = 2", '[placement]\npolicy = "static"\nagents = ["a", 3]'))
    assert_parts(message, "placement.agents[1] = 3", "expected a string", "allowed: an agent id")


def test_agents_without_static_policy(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2", '[placement]\nagents = ["a", "b"]'))
    assert_parts(message, "placement.agents = ['a', 'b']", "only used with policy = 'static' (policy is 'pack')")


# --- [workload] ------------------------------------------------------------------------------


def test_samples_exceed_micro_batch(tmp_path: Path) -> None:
    message = load_error(
        tmp_path,
        with_pipeline("stages = 2\nmicro_batch_size = 4", "[workload]\nsamples = [1, 6]"),
    )
    assert_parts(
        message,
        "workload.samples = [1, 6]",
        "a request must fit in one micro-batch",
        "pipeline.micro_batch_size = 4",
        "allowed: ",
        "<= pipeline.micro_batch_size (4)",
    )


def test_samples_min_above_max(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2", "[workload]\nsamples = [4, 2]"))
    assert_parts(message, "workload.samples = [4, 2]", "1 <= min <= max", "allowed: ")


def test_requests_below_one(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2", "[workload]\nrequests = 0"))
    assert_parts(message, "workload.requests = 0", "allowed: an integer >= 1")


def test_concurrency_with_open_loop(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2", "[workload]\nrate = 10\nconcurrency = 4"))
    assert_parts(message, "workload.concurrency = 4", "closed loop", "allowed: 0")


def test_missing_input_file(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2", '[workload]\ninput_file = "in.safetensors"'))
    resolved = tmp_path.resolve() / "in.safetensors"
    assert_parts(message, "workload.input_file = 'in.safetensors'", f"no such file (resolved to {resolved})")
    assert_parts(message, "allowed: an existing .safetensors file")


def test_unknown_workload_key(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2", "[workload]\nrequest_timeout = 5"))
    assert_parts(
        message,
        "workload.request_timeout = 5",
        "did you mean 'request_timeout_s'?",
        "allowed: requests",
    )


def test_parse_job_names_string_source() -> None:
    with pytest.raises(ConfigError) as info:
        parse_job({"model": {"source": "builtin:x"}, "pipeline": {"stages": 1, "graph": "star"}})
    assert str(info.value).startswith("<string>: pipeline.graph = 'star': unknown graph")


# --- [generation] ------------------------------------------------------------------------------


def test_generation_defaults_and_loop_edges(tmp_path: Path) -> None:
    from infscaled.planning.job import generation_plan, loop_edges, ports_needed
    from infscaled.protocol.plan import Node

    cfg = load_job(write(tmp_path, with_pipeline('stages = 3\nreplicas = [2, 2, 2]\ngraph = "parallel"',
                                                 "[generation]\nkv_budget_tokens = 512")))
    assert cfg.generation is not None and cfg.generation.kv_budget_tokens == 512
    assert loop_edges(cfg) == ((Node(2, 0), Node(0, 0)), (Node(2, 1), Node(0, 1)))
    assert generation_plan(cfg).micro_batches_in_flight == 3  # type: ignore[union-attr] # one per stage
    assert ports_needed(cfg) == 2 + 2 * 2 + 2 + 2  # dispatcher in, 2 hops x 2 chains, out, 2 loop edges


def test_generation_needs_replica_chains(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2\nreplicas = [1, 2]", "[generation]"))
    assert_parts(message, "pipeline.replicas = [1, 2]", "[generation] needs replica chains",
                 'allowed: the same replica count for every stage, with pipeline.graph = "parallel"')
    message = load_error(tmp_path, with_pipeline("stages = 2\nreplicas = [2, 2]", "[generation]"))
    assert_parts(message, "pipeline.replicas = [2, 2]", "but pipeline.graph = 'mesh'")


def test_generation_bad_values(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_pipeline("stages = 2", "[generation]\nkv_budget_tokens = 0"))
    assert_parts(message, "generation.kv_budget_tokens = 0", "allowed: an integer >= 1")
    message = load_error(tmp_path, with_pipeline("stages = 2", "[generation]\noutput_tokens = [9, 3]"))
    assert_parts(message, "generation.output_tokens = [9, 3]", "1 <= min <= max")
    message = load_error(tmp_path, with_pipeline("stages = 2", "[generation]\nkv_budget = 64"))
    assert_parts(message, "generation.kv_budget = 64", "did you mean 'kv_budget_tokens'?")
    message = load_error(tmp_path, with_pipeline("stages = 2", "[generation]\nprefill_chunk_tokens = -1"))
    assert_parts(message, "generation.prefill_chunk_tokens = -1", "allowed: an integer >= 0")
    message = load_error(tmp_path, with_pipeline("stages = 2", '[generation]\nprefill_chunk_tokens = "512"'))
    assert_parts(message, "generation.prefill_chunk_tokens = '512'", "expected an integer")


def test_prefill_chunk_tokens_reaches_the_plan(tmp_path: Path) -> None:
    from infscaled.planning.job import generation_plan

    for text, want in (("", 512), ("prefill_chunk_tokens = 64", 64), ("prefill_chunk_tokens = 0", 0)):
        cfg = load_job(write(tmp_path, with_pipeline("stages = 2", f"[generation]\n{text}")))
        assert generation_plan(cfg).prefill_chunk_tokens == want  # type: ignore[union-attr]
