"""BERT, ResNet and plain-torch chains: split pipelines against the monolithic model (in-process)."""

from __future__ import annotations

import itertools
import sys
import time
import types
from functools import cache

import pytest
import torch
from torch import nn

from infscaled.errors import ModelError
from infscaled.models import inputs
from infscaled.models.builtins import builtin_config
from infscaled.models.sources import ResolvedModel, resolve
from infscaled.models.stage import Monolith, Skeleton, Stage, build_stage, skeleton

BERT, RESNET, VGG = "builtin:bert-tiny", "builtin:resnet-tiny", "python:infscaled.models.zoo:vgg_tiny"
SOURCES = [BERT, RESNET, VGG]
TOL = {"atol": 1e-4, "rtol": 1e-4}
SEED = 7
# The seeded init is He-scaled, so the deep random nets keep O(1) outputs; no input scaling.
INPUT_SCALE: dict[str, float] = {}
# Cut layouts, as functions of the unit count n: boundaries between stages.
CUTS = {
    "1": lambda n: (),
    "2-first": lambda n: (1,),
    "2-mid": lambda n: (n // 2,),
    "2-last": lambda n: (n - 1,),
    "3": lambda n: (n // 3, 2 * n // 3),
    "4": lambda n: (1, n // 2, n - 1),
}


def ranges(n: int, cuts: tuple[int, ...]) -> list[tuple[int, int]]:
    bounds = (0, *cuts, n)
    return [(a, b - 1) for a, b in itertools.pairwise(bounds)]


@cache
def monolith(source: str) -> Monolith:
    return Monolith(resolve(source), "cpu", "float32", SEED)


def make_requests(source: str, spec: inputs.InputSpec) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if spec.kind == "tokens":  # different lengths: the micro-batch is right-padded
        shapes = [(2, 5), (1, 11), (2, 3), (1, 8)]
        return [inputs.example_request(spec, s, t, gen) for s, t in shapes]
    scale = INPUT_SCALE.get(source, 1.0)
    return [inputs.example_request(spec, s, 0, gen) * scale for s in (2, 1, 3)]


@torch.inference_mode()
def run_pipeline(stages: list[Stage], act: inputs.Activation) -> torch.Tensor:
    for stage in stages:
        act = stage(act)
    assert set(act) == {"output"}
    return act["output"]


@pytest.mark.parametrize("layout", list(CUTS))
@pytest.mark.parametrize("source", SOURCES)
def test_split_pipeline_matches_monolith(source: str, layout: str) -> None:
    resolved = resolve(source)
    spec = resolved.family.input_spec()
    n = skeleton(resolved).unit_count
    stages = [build_stage(resolved, a, b, "cpu", "float32", SEED) for a, b in ranges(n, CUTS[layout](n))]
    requests = make_requests(source, spec)
    out = run_pipeline(stages, inputs.collate(spec, requests, torch.float32))
    results = inputs.split(spec, out, requests)
    assert out.shape[0] == sum(r.shape[0] for r in requests) and out.ndim == 2
    assert out.std() > 0.1, "outputs near constant: the comparison would mean nothing"
    assert out.std(dim=0).mean() > 0.05, "outputs do not depend on the input"
    ref = monolith(source)
    for request, got in zip(requests, results, strict=True):
        alone = ref.forward(inputs.collate(spec, [request], torch.float32))
        torch.testing.assert_close(got, alone, **TOL)


def expected_prefixes(source: str, sk: Skeleton) -> list[list[str]]:
    """Each unit's full-model name prefixes, from the model's structure rather than the adapter."""
    model = sk.model
    if source == BERT:
        layers = [[f"bert.encoder.layer.{i}."] for i in range(len(model.bert.encoder.layer))]
        return [["bert.embeddings."], *layers, ["bert.pooler.", "classifier."]]
    if source == RESNET:
        layers = [[f"resnet.encoder.stages.{s}.layers.{i}."]
                  for s, stage in enumerate(model.resnet.encoder.stages) for i in range(len(stage.layers))]
        return [["resnet.embedder."], *layers, ["classifier."]]
    # A Sequential-only chain: the leaves in definition order.
    return [[f"{name}."] for name, m in model.named_modules() if not list(m.children())]


@pytest.mark.parametrize("source", SOURCES)
def test_stage_holds_exactly_its_units_parameters(source: str) -> None:
    resolved = resolve(source)
    sk = skeleton(resolved)
    prefixes = expected_prefixes(source, sk)
    assert sk.unit_count == len(prefixes)
    all_names = [name for name, _ in sk.model.named_parameters()]
    held: list[str] = []
    for a, b in ranges(sk.unit_count, CUTS["4"](sk.unit_count)):
        stage = build_stage(resolved, a, b, "cpu", "float32", SEED)
        mine = tuple(p for unit in prefixes[a:b + 1] for p in unit)
        assert sorted(stage.param_names) == sorted(n for n in all_names if n.startswith(mine))
        tensors = [*stage.parameters(), *stage.buffers()]
        assert tensors and all(t.device.type == "cpu" for t in tensors)
        held += stage.param_names
    assert sorted(held) == sorted(all_names)  # a 4-stage split covers the model with no overlap


def test_bert_eager_attention_mask_matches() -> None:
    """The padding mask follows the attention implementation (eager: additive float mask)."""
    from infscaled.models.families.bert import BertFamily

    config = builtin_config("bert-tiny")
    config._attn_implementation = "eager"
    resolved = ResolvedModel("test:bert-eager", BertFamily(config), None)
    n = skeleton(resolved).unit_count
    stages = [build_stage(resolved, a, b, "cpu", "float32", SEED) for a, b in ranges(n, (2,))]
    ref = Monolith(resolved, "cpu", "float32", SEED)
    assert ref.model.config._attn_implementation == "eager"
    spec = resolved.family.input_spec()
    requests = make_requests(BERT, spec)
    results = inputs.split(spec, run_pipeline(stages, inputs.collate(spec, requests, torch.float32)), requests)
    for request, got in zip(requests, results, strict=True):
        torch.testing.assert_close(got, ref.forward(inputs.collate(spec, [request], torch.float32)), **TOL)


def randomize(model: nn.Module, std: float) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif p.ndim < 2:  # norm scales
                p.copy_(1 + torch.randn(p.shape, generator=gen) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std / p[0].numel() ** 0.5)


@pytest.mark.parametrize("source", [BERT, RESNET])
def test_safetensors_checkpoint_pipeline(source: str, tmp_path) -> None:
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    name = source.removeprefix("builtin:")
    if source == BERT:
        from transformers import BertForSequenceClassification

        model = BertForSequenceClassification(builtin_config(name))
        auto: type = AutoModelForSequenceClassification
        randomize(model, std=1.0)
    else:
        from transformers import ResNetForImageClassification

        model = ResNetForImageClassification(builtin_config(name))
        auto = AutoModelForImageClassification
        randomize(model, std=2.0)
        gen = torch.Generator().manual_seed(2)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-default running stats prove buffers load
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    model.save_pretrained(tmp_path)

    resolved = resolve(str(tmp_path))
    assert resolved.checkpoint_dir == tmp_path
    spec = resolved.family.input_spec()
    n = skeleton(resolved).unit_count
    stages = [build_stage(resolved, a, b, "cpu", "float32", SEED) for a, b in ranges(n, CUTS["3"](n))]
    if source == RESNET:
        stem_bn = stages[0].units[0].embedder.embedder.normalization
        torch.testing.assert_close(stem_bn.running_mean, model.resnet.embedder.embedder.normalization.running_mean)

    reference = auto.from_pretrained(tmp_path).eval()
    requests = make_requests(source, spec)
    out = run_pipeline(stages, inputs.collate(spec, requests, torch.float32))
    assert out.std() > 0.1
    for request, got in zip(requests, inputs.split(spec, out, requests), strict=True):
        with torch.inference_mode():
            act = inputs.collate(spec, [request], torch.float32)
            want = reference(**act).logits
        torch.testing.assert_close(got, want, **TOL)


def test_chain_without_input_shape_is_a_clear_error(monkeypatch) -> None:
    module = types.ModuleType("infscaled_test_factories")
    module.no_shape = lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU())  # type: ignore[attr-defined]
    module.not_a_module = lambda: "nope"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)

    source = "python:infscaled_test_factories:no_shape"
    resolved = resolve(source)
    for attempt in (lambda: skeleton(resolved), resolved.family.input_spec):
        with pytest.raises(ModelError, match="input_shape") as err:
            attempt()
        assert source in str(err.value) and "model.input_shape = (" in str(err.value)
    with pytest.raises(ModelError, match="not a torch.nn.Module"):
        skeleton(resolve("python:infscaled_test_factories:not_a_module"))
    with pytest.raises(ModelError, match="cannot import"):
        resolve("python:infscaled_test_factories:missing")


def test_chain_units_flatten_nested_sequentials_and_keep_repeats() -> None:
    from infscaled.models.families.chain import ChainFamily

    relu = nn.ReLU()

    def factory() -> nn.Module:
        model = nn.Sequential(nn.Linear(4, 8), relu, nn.Sequential(nn.Sequential(nn.Linear(8, 8)), relu),
                              nn.Linear(8, 2))
        model.input_shape = (4,)  # type: ignore[assignment]
        return model

    sk = skeleton(ResolvedModel("test:chain", ChainFamily(factory, "test:chain"), None))
    assert [type(u.module).__name__ for u in sk.units] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert sk.family.input_spec().sample_shape == (4,)


def test_vgg16_skeleton_is_instant_and_real_sized() -> None:
    started = time.perf_counter()
    resolved = resolve("python:infscaled.models.zoo:vgg16")
    sk = skeleton(resolved)
    elapsed = time.perf_counter() - started
    assert sum(sk.unit_weights()) == 138_357_544
    assert all(p.device.type == "meta" for p in sk.model.parameters())
    assert elapsed < 2.0, f"building the meta skeleton took {elapsed:.2f}s"
    assert resolved.family.input_spec().sample_shape == (3, 224, 224)
    convs = [m for m in sk.model.modules() if isinstance(m, nn.Conv2d)]
    pools = [m for m in sk.model.modules() if isinstance(m, nn.MaxPool2d)]
    assert (len(convs), len(pools)) == (13, 5)
