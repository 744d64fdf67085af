"""Live metrics: window and percentile helpers, dispatcher request stats, the Metrics message,
and the controller's Prometheus rendering (parsed with prometheus_client's own parser).
The end-to-end flow (workers -> agent -> controller -> GET /metrics) is in test_daemon.py."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from infscaled.config import parse_job
from infscaled.controller import agent_metrics, export
from infscaled.controller.jobs import Job, JobState, NodeStatus
from infscaled.errors import WireError
from infscaled.protocol import messages
from infscaled.protocol.control import DispatcherStats, StageStats
from infscaled.protocol.window import EventWindow, mean, percentile, rate, span
from infscaled.worker.request_stats import RequestStats


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.9) == 90.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile(values, 0.0) == 1.0
    assert percentile([], 0.5) == 0.0
    assert percentile([7.0], 0.99) == 7.0
    with pytest.raises(ValueError):
        percentile(values, 1.5)


def test_event_window_keeps_only_the_last_window_s_and_is_bounded() -> None:
    w = EventWindow(window_s=5.0, max_events=3)
    w.add(0.0, 1.0)
    w.add(4.0, 2.0)
    assert w.sums(4.0, 1) == (2, [3.0])
    assert w.sums(6.0, 1) == (1, [2.0])  # t=0 fell out of [1, 6]
    for t in (6.0, 6.1, 6.2, 6.3):
        w.add(t, 1.0)
    assert w.sums(6.3, 1)[0] == 3  # max_events caps a burst
    assert w.sums(100.0, 1) == (0, [0.0])


def test_span_rate_and_mean() -> None:
    assert span(10.0, None, 5.0) == 0.0
    assert span(10.0, 8.0, 5.0) == 2.0  # just started: the window covers 2 s, not 5
    assert span(10.0, 1.0, 5.0) == 5.0
    assert rate(10.0, 2.0) == 5.0 and rate(10.0, 0.0) == 0.0
    assert mean(3.0, 2) == 1.5 and mean(3.0, 0) == 0.0


def test_request_stats_window_rates_and_quantiles() -> None:
    rs = RequestStats(started=0.0)
    for i in range(100):
        rs.finished(2, (i + 1) / 1000, now=10.0 + i * 0.01)  # 100 requests in the last second
    rs.rejected, rs.timed_out, rs.inflight = 3, 1, 4
    s = rs.snapshot(inflight_micro_batches=2, now=11.0)
    assert (s.requests, s.samples, s.rejected, s.timed_out, s.inflight_requests, s.inflight_micro_batches) == \
        (100, 200, 3, 1, 4, 2)
    assert s.requests_per_s == pytest.approx(100 / 5.0)
    assert s.samples_per_s == pytest.approx(200 / 5.0)
    assert (s.latency_p50_s, s.latency_p90_s, s.latency_p99_s) == pytest.approx((0.050, 0.090, 0.099))
    later = rs.snapshot(0, now=30.0)
    assert later.requests_per_s == 0.0 and later.latency_p99_s == 0.0 and later.requests == 100


def test_metrics_message_round_trips_and_checks_types() -> None:
    msg = messages.Metrics("j1", [StageStats("0.0", 3, 9, occupancy=0.25)], DispatcherStats(requests=2))
    assert messages.decode(messages.encode(msg)) == msg
    assert messages.decode(messages.encode(messages.Metrics("j1"))) == messages.Metrics("j1")
    bad = messages.encode(msg).replace('"occupancy": 0.25', '"occupancy": "high"')
    with pytest.raises(WireError, match="occupancy"):
        messages.decode(bad)


def _job() -> Job:
    cfg = parse_job({"name": "m", "model": {"source": "builtin:gpt2-tiny"},
                     "pipeline": {"stages": 2, "replicas": [1, 2]}}, "m.toml")
    job = Job("m-1", cfg, (1, 1, 1, 1), ((0, 1), (2, 3)), 0.0, state=JobState.RUNNING)
    job.nodes = {"0.0": NodeStatus("a1", "cpu:0"), "1.0": NodeStatus("a1", "cpu:1"),
                 "1.1": NodeStatus("a2", "cpu:0"), "dispatcher": NodeStatus("a1", "")}
    job.dispatcher_agent = "a1"
    return job


def test_prometheus_text_parses_with_labels_and_units() -> None:
    job = _job()
    job.metrics["a1"] = (9.0, messages.Metrics("m-1", [StageStats("0.0", 5, 20, 1.5, occupancy=0.5),
                                                       StageStats("1.0", 2, 8, occupancy=0.25)],
                                               DispatcherStats(requests=4, latency_p99_s=0.2, latency_sum_s=0.5,
                                                               replayed=3, duplicates=1)))
    job.metrics["a2"] = (9.5, messages.Metrics("m-1", [StageStats("1.1", 3, 12, occupancy=0.75)]))
    text = export.render(export.collect([job], now=10.0))
    families = {f.name: f for f in text_string_to_metric_families(text)}

    occupancy = {(s.labels["stage"], s.labels["replica"], s.labels["agent"]): s.value
                 for s in families["infscaled_stage_occupancy_ratio"].samples}
    assert occupancy == {("0", "0", "a1"): 0.5, ("1", "0", "a1"): 0.25, ("1", "1", "a2"): 0.75}
    assert families["infscaled_stage_samples"].type == "counter"
    assert {s.value for s in families["infscaled_stage_samples"].samples} == {20, 8, 12}
    assert [s.value for s in families["infscaled_stage_compute_seconds"].samples][0] == 1.5
    states = {s.labels["state"]: s.value for s in families["infscaled_job_state"].samples}
    assert states["running"] == 1 and states["stopped"] == 0
    latency = families["infscaled_dispatcher_latency_seconds"]
    assert latency.type == "summary"
    q = {s.labels.get("quantile"): s.value for s in latency.samples if s.name.endswith("_seconds")}
    assert q["0.99"] == 0.2
    assert {s.name: s.value for s in latency.samples if not s.labels.get("quantile")} == {
        "infscaled_dispatcher_latency_seconds_sum": 0.5, "infscaled_dispatcher_latency_seconds_count": 4}
    # Recovery's counters (dispatch/core.py): requests (sequences) sent again, late answers dropped.
    for name, value in (("infscaled_dispatcher_replayed_requests", 3), ("infscaled_dispatcher_duplicates_dropped", 1)):
        assert families[name].type == "counter"
        assert [(s.labels, s.value) for s in families[name].samples] == [({"job": "m-1", "agent": "a1"}, value)]

    job.state = JobState.STOPPED  # no stale numbers for a job that is gone
    families = {f.name: f for f in text_string_to_metric_families(export.render(export.collect([job])))}
    assert not families["infscaled_stage_occupancy_ratio"].samples


def test_host_and_device_usage_series() -> None:
    usage = [messages.HostMetrics("a1", 0.5, 1 << 30, [messages.DeviceUsage("cuda:0", 0.75, 2 << 30),
                                                       messages.DeviceUsage("cuda:1", 0.0, 0)]),
             messages.HostMetrics("a2", 0.25, 2 << 30, [messages.DeviceUsage("cpu:0")])]  # unmeasured
    series = agent_metrics.AgentSeries()
    families = {f.name: f for f in text_string_to_metric_families(series.render(usage))}

    async def streamed() -> str:
        return "".join([piece async for piece in series.stream(usage, chunk=1)])

    assert series.render(usage) == asyncio.run(streamed())  # the same, in pieces
    assert {s.labels["agent"]: s.value for s in families["infscaled_agent_cpu_ratio"].samples} == {"a1": 0.5,
                                                                                                  "a2": 0.25}
    assert families["infscaled_agent_memory_used_bytes"].samples[1].value == 2 << 30
    util = {(s.labels["agent"], s.labels["device"]): s.value
            for s in families["infscaled_device_utilization_ratio"].samples}
    assert util == {("a1", "cuda:0"): 0.75, ("a1", "cuda:1"): 0.0}  # a CPU slot has no series
    assert [s.value for s in families["infscaled_device_memory_used_bytes"].samples] == [2 << 30, 0]


def test_label_values_are_escaped() -> None:
    text = export.render([export.Family("x", "gauge", "h", [("", {"job": 'a"b\\c\nd'}, 1.0)])])
    (family,) = text_string_to_metric_families(text)
    assert family.samples[0].labels["job"] == 'a"b\\c\nd'


def test_job_snapshot_lists_every_stage_in_order() -> None:
    job = _job()
    job.metrics["a2"] = (9.5, messages.Metrics("m-1", [StageStats("1.1", 3, 12)]))
    job.metrics["a1"] = (9.0, messages.Metrics("m-1", [StageStats("1.0", 2, 8), StageStats("0.0", 5, 20)],
                                               DispatcherStats(requests=4)))
    snap = export.job_snapshot(job, now=10.0)
    assert [(s["node"], s["agent"], s["samples"]) for s in snap["stages"]] == \
        [("0.0", "a1", 20), ("1.0", "a1", 8), ("1.1", "a2", 12)]
    assert snap["dispatcher"]["requests"] == 4 and snap["dispatcher"]["agent"] == "a1"
    assert snap["stages"][2]["age_s"] == 0.5


def test_metrics_switch_reads_on_or_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from infscaled.worker.entry import METRICS_ENV, metrics_enabled

    monkeypatch.delenv(METRICS_ENV, raising=False)
    assert metrics_enabled()
    monkeypatch.setenv(METRICS_ENV, "OFF")
    assert not metrics_enabled()
    monkeypatch.setenv(METRICS_ENV, "maybe")
    with pytest.raises(ValueError, match="INFSCALED_METRICS='maybe': expected 'on' or 'off'"):
        metrics_enabled()
