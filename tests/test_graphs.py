"""CUDA graphs for stage forwards, the parts that need no GPU: the replay key, the eager /
capture / replay bookkeeping (with a stand-in for the capture), replaying into clones, the job
option's way to the workers, and that an unpadded decoder stage reads no device value on the
host (which a capture forbids). Replays on real GPUs: tests/test_gpu.py."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from infscaled.config import parse_job
from infscaled.planning.job import plan_job, ports_needed
from infscaled.protocol.plan import plan_from_dict, plan_to_dict
from infscaled.worker import graphs
from infscaled.worker.graphs import StageGraphs, _Graph, graph_key, static_outputs

DEV = "meta"  # stands for the stage's device in graph_key; cpu tensors are host tensors


def _act(b: int = 2, t: int = 5, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    return {"hidden": torch.empty(b, t, 8, device=DEV),
            "attention_mask": torch.ones(b, t, dtype=torch.int64) if mask is None else mask}


# -- graph_key ------------------------------------------------------------------------------------


def test_key_records_device_shapes_and_an_all_ones_host_mask() -> None:
    key = graph_key(_act(), DEV)
    assert key == (("hidden", (2, 5, 8), torch.float32), ("attention_mask", (2, 5), torch.int64, "all ones"))
    assert graph_key({**_act(), "requests": torch.tensor([[7, 2]])}, DEV) == key  # the request table is ignored
    assert graph_key(_act(t=6), DEV) != key
    assert graph_key({"input_ids": torch.empty(2, 5, dtype=torch.int64, device=DEV)}, DEV) == (
        ("input_ids", (2, 5), torch.int64),)


def test_key_is_none_when_host_values_would_change_the_forward() -> None:
    padded = torch.ones(2, 5, dtype=torch.int64)
    padded[1, 3:] = 0
    assert graph_key(_act(mask=padded), DEV) is None  # padded: units take the device-mask path
    assert graph_key({**_act(), "scale": torch.ones(1)}, DEV) is None  # any other host tensor
    assert graph_key({"attention_mask": torch.ones(2, 5)}, DEV) is None  # nothing on the device to replay


# -- StageGraphs bookkeeping (capture replaced: it needs CUDA) ------------------------------------


class _DoublingGraph:
    """Stands in for a captured CUDAGraph of `hidden * 2`: replay() rewrites the static output."""

    def __init__(self, static_in: torch.Tensor, static_out: torch.Tensor) -> None:
        self.static_in, self.static_out = static_in, static_out

    def replay(self) -> None:
        self.static_out.copy_(self.static_in * 2)


def _fake_capture(captured: list[Any], fail_for: int | None = None) -> Any:
    def capture(self: StageGraphs, act: dict[str, torch.Tensor]) -> _Graph:
        if fail_for is not None and act["hidden"].shape[1] == fail_for:
            raise RuntimeError("operation not permitted when stream is capturing")
        captured.append(tuple(act["hidden"].shape))
        static_in, static_out = torch.empty_like(act["hidden"]), torch.empty_like(act["hidden"])
        host = {"attention_mask": act["attention_mask"]}
        outputs = static_outputs({"hidden": static_out, **host}, host, DEV)
        return _Graph(_DoublingGraph(static_in, static_out), {"hidden": static_in}, outputs)
    return capture


def _stage(calls: list[int]) -> Any:
    def stage(act: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        calls.append(act["hidden"].shape[1])
        return {"hidden": act["hidden"] * 2, "attention_mask": act["attention_mask"]}
    return stage


def test_warmup_then_one_capture_then_replays(monkeypatch: pytest.MonkeyPatch) -> None:
    captured: list[Any] = []
    calls: list[int] = []
    monkeypatch.setattr(StageGraphs, "_capture", _fake_capture(captured))
    g = StageGraphs("1.0", _stage(calls), None, warmup=2, device_type=DEV)
    acts = [_act() for _ in range(6)]
    outs = [g.run(a) for a in acts]
    assert calls == [5, 5]  # two eager runs, then the capture, then replays only
    assert captured == [(2, 5, 8)] and g.captured == 1 and g.replays == 4
    assert all(o["attention_mask"] is a["attention_mask"] for o, a in zip(outs, acts, strict=True))


def test_replay_returns_clones_and_the_current_host_inputs() -> None:
    static_in, static_out = torch.zeros(2, 3), torch.zeros(2, 3)  # real values: "cpu" is the device here
    mask_a, mask_b = torch.ones(2, 3, device=DEV), torch.ones(2, 3, device=DEV)
    outputs = static_outputs({"hidden": static_out, "attention_mask": mask_a}, {"attention_mask": mask_a}, "cpu")
    graph = _Graph(_DoublingGraph(static_in, static_out), {"hidden": static_in}, outputs)
    first = graph.replay({"hidden": torch.ones(2, 3), "attention_mask": mask_a})
    second = graph.replay({"hidden": torch.full((2, 3), 3.0), "attention_mask": mask_b})
    assert torch.equal(first["hidden"], torch.full((2, 3), 2.0))  # not overwritten by the next replay
    assert torch.equal(second["hidden"], torch.full((2, 3), 6.0))
    assert second["hidden"] is not static_out and second["attention_mask"] is mask_b
    with pytest.raises(ValueError, match="computed on the host"):
        static_outputs({"lengths": torch.ones(2)}, {"attention_mask": mask_a}, "cuda")


def test_failed_capture_warns_once_and_stays_eager(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    captured: list[Any] = []
    calls: list[int] = []
    monkeypatch.setattr(StageGraphs, "_capture", _fake_capture(captured, fail_for=7))
    g = StageGraphs("0.0", _stage(calls), None, warmup=1, device_type=DEV)
    with caplog.at_level(logging.WARNING, logger=graphs.__name__):
        for _ in range(5):
            assert g.run(_act(t=7))["hidden"].shape == (2, 7, 8)
        for _ in range(3):
            g.run(_act(t=9))
    assert calls == [7] * 5 + [9]  # shape 7: eager for good (capture tried once); shape 9: captured
    assert captured == [(2, 9, 8)] and g.replays == 2
    warnings = [r for r in caplog.records if "capture failed" in r.getMessage()]
    assert len(warnings) == 1 and "hidden [2, 7, 8]" in warnings[0].getMessage()
    # A failed capture uses up one of the max_graphs tries.
    g = StageGraphs("0.0", _stage(calls), None, warmup=0, max_graphs=1, device_type=DEV)
    g.run(_act(t=7))
    g.run(_act(t=9))
    assert g.captured == 0 and g.replays == 0


def test_graph_limit_and_unkeyed_micro_batches_run_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    captured: list[Any] = []
    calls: list[int] = []
    monkeypatch.setattr(StageGraphs, "_capture", _fake_capture(captured))
    g = StageGraphs("0.0", _stage(calls), None, warmup=1, max_graphs=1, device_type=DEV)
    for t in (3, 3, 4, 4, 4, 3):
        g.run(_act(t=t))
    padded = torch.ones(2, 3, dtype=torch.int64)
    padded[0, 2] = 0
    g.run(_act(t=3, mask=padded))
    assert captured == [(2, 3, 8)] and g.captured == 1
    assert calls == [3, 4, 4, 4, 3]  # shape 4 arrived after the limit; the padded one has no key
    assert g.replays == 2


# -- the job option ---------------------------------------------------------------------------------


def test_cuda_graphs_option_reaches_the_plan_and_survives_the_wire(tmp_path: Path) -> None:
    for value in (True, False):
        cfg = parse_job({"model": {"source": "builtin:tiny-gpt"},
                         "pipeline": {"stages": 2, "cuda_graphs": value}}, str(tmp_path / "j.toml"), base_dir=tmp_path)
        plan = plan_job(cfg, [1, 1, 1, 1], ["cpu", "cpu"], list(range(7000, 7000 + ports_needed(cfg))), "127.0.0.1")
        assert plan.cuda_graphs is value
        assert plan_from_dict(plan_to_dict(plan)).cuda_graphs is value


# -- capture safety of the model code -------------------------------------------------------------


class _HostToDevice(TorchDispatchMode):
    """Records every op that feeds a host (CPU) tensor into a device (meta) result: a host-to-device
    copy, pageable for anything not pinned, which a capture would either reject or freeze."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        host_in = any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in tree_flatten((args, kwargs))[0])
        if host_in and any(isinstance(o, torch.Tensor) and o.device.type == DEV for o in tree_flatten(out)[0]):
            self.ops.append(str(func))
        return out


@pytest.mark.parametrize("source", ["builtin:llama-tiny-last", "builtin:llama-tiny", "builtin:mistral-tiny",
                                    "builtin:qwen2-tiny", "builtin:gpt2-tiny"])
def test_unpadded_stage_forward_is_capturable(source: str) -> None:
    """The whole model on the meta device with an all-ones host mask: any `.item()`, `bool(t)` or
    device-to-host copy of a device tensor raises here, as it would invalidate a CUDA graph
    capture (and cost a host sync per micro-batch when eager); and no host tensor reaches the device."""
    from infscaled.models.sources import resolve
    from infscaled.models.stage import Stage, skeleton

    sk = skeleton(resolve(source))  # parameters on meta
    shared = {k: m.to(DEV) for k, m in sk.family.shared(sk.model).items()}
    stage = Stage(list(sk.units), shared, 0, sk.unit_count - 1, [])
    act = {"input_ids": torch.zeros(2, 6, dtype=torch.int64, device=DEV),
           "attention_mask": torch.ones(2, 6, dtype=torch.int64)}
    assert graph_key(act, DEV) is not None
    watch = _HostToDevice()
    with torch.inference_mode(), watch:
        out = stage(act)
    assert out["output"].device.type == DEV and out["output"].shape[0] == 2
    assert watch.ops == []
