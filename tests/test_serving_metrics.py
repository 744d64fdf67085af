"""The serving series (vLLM's names under `infscaled:`): recorded by a front end's ServingMetrics,
scraped and relabelled by the controller (export.serving_text), parsed with prometheus_client's
own parser. The end-to-end path (served job -> GET /metrics) is in test_serve.py."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from infscaled.config import parse_job
from infscaled.controller import export
from infscaled.controller.jobs import Job, JobState
from infscaled.generation.metrics import RequestTimes, ServingMetrics
from infscaled.protocol import messages
from infscaled.protocol.control import StageStats

GEN_JOB = {"name": "chat", "model": {"source": "builtin:llama-tiny"}, "pipeline": {"stages": 2},
           "generation": {"kv_budget_tokens": 160}}


def _families(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_serving_metrics_record_latencies_tokens_and_finish_reasons() -> None:
    m = ServingMetrics("job-1", lambda: (3, 2))
    m.accepted(10)
    times = RequestTimes(arrived=100.0, admitted=100.2)  # waited 0.2 s for KV room
    for at in (100.5, 100.7, 101.0):
        times.token(at)
    m.finished(times, "length", now=101.25)
    m.accepted(4)
    m.finished(RequestTimes(arrived=102.0), "abort", now=102.1)  # the client left before a token
    m.finished(RequestTimes(arrived=102.0, admitted=102.3), "abort", now=102.4)  # admitted, no token yet
    f = _families(m.render().decode())
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for samples in f.values() for s in samples}
    model = (("model_name", "job-1"),)
    assert value[("infscaled:prompt_tokens_total", model)] == 14
    assert value[("infscaled:generation_tokens_total", model)] == 3
    assert value[("infscaled:request_success_total", (("finished_reason", "length"), *model))] == 1
    assert value[("infscaled:request_success_total", (("finished_reason", "abort"), *model))] == 2
    assert value[("infscaled:num_requests_running", model)] == 3
    assert value[("infscaled:num_requests_waiting", model)] == 2
    assert value[("infscaled:time_to_first_token_seconds_sum", model)] == 0.5
    assert value[("infscaled:time_to_first_token_seconds_count", model)] == 1  # the aborted one had no token
    assert value[("infscaled:e2e_request_latency_seconds_sum", model)] == 1.25
    assert value[("infscaled:request_decode_time_seconds_sum", model)] == 0.5
    # Queue time for each admitted request (0.2 + 0.3), prefill from admission to the first token.
    assert value[("infscaled:request_queue_time_seconds_count", model)] == 2
    assert abs(value[("infscaled:request_queue_time_seconds_sum", model)] - 0.5) < 1e-9
    assert value[("infscaled:request_prefill_time_seconds_count", model)] == 1
    assert abs(value[("infscaled:request_prefill_time_seconds_sum", model)] - 0.3) < 1e-9
    # A backend that does not report admission: admitted on arrival (no queue), prefill = TTFT.
    m2 = ServingMetrics("job-2", lambda: (0, 0))
    quick = RequestTimes(arrived=10.0)
    quick.token(10.4)
    m2.finished(quick, "length", now=10.4)
    f2 = _families(m2.render().decode())
    value2 = {s.name: s.value for samples in f2.values() for s in samples}
    queue2 = "infscaled:request_queue_time_seconds"
    assert (value2[queue2 + "_sum"], value2[queue2 + "_count"]) == (0, 1)
    assert abs(value2["infscaled:request_prefill_time_seconds_sum"] - 0.4) < 1e-9
    assert value[("infscaled:inter_token_latency_seconds_count", model)] == 2
    assert abs(value[("infscaled:inter_token_latency_seconds_sum", model)] - 0.5) < 1e-9
    assert value[("infscaled:time_to_first_token_seconds_bucket", (("le", "0.5"), *model))] == 1
    assert value[("infscaled:time_to_first_token_seconds_bucket", (("le", "0.25"), *model))] == 0


def test_controller_relabels_scraped_series_by_job_name_and_adds_kv_usage() -> None:
    cfg = parse_job(GEN_JOB, "chat.toml")
    old = Job("chat-aaaaaa", cfg, (1, 1), ((0, 1),), 1.0, state=JobState.RUNNING)
    new = Job("chat-bbbbbb", cfg, (1, 1), ((0, 1),), 2.0, state=JobState.RUNNING)
    new.metrics["a1"] = (9.0, messages.Metrics(new.id, [StageStats("0.0", kv_reserved_tokens=40, kv_budget_tokens=160),
                                                         StageStats("1.0", kv_reserved_tokens=40, kv_budget_tokens=160)]))
    scraped = {}
    for job, tokens in ((old, 7), (new, 5)):
        m = ServingMetrics(job.id, lambda: (0, 0))
        m.accepted(tokens)
        scraped[job.id] = m.render().decode()
    f = _families(export.serving_text([old, new], scraped))
    [prompt] = f["infscaled:prompt_tokens"]
    assert prompt.labels == {"model_name": "chat"} and prompt.value == 5  # the newer job of that name
    [kv] = f["infscaled:kv_cache_usage_perc"]
    assert kv.labels == {"model_name": "chat"} and kv.value == 0.25
    new.state = JobState.STOPPED
    assert not _families(export.serving_text([old, new], scraped))["infscaled:kv_cache_usage_perc"][0].value
