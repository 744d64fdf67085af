"""Per-request serving metrics of a generation front end, under vLLM's names (`infscaled:` prefix).

One `ServingMetrics` per front end (a job's dispatcher, or a test server) owns its own
prometheus_client registry: histograms of time to first token, inter-token latency, end-to-end
latency, queue time, prefill time and decode time, counters of prompt / generated tokens and of finished requests by
reason, gauges of running / waiting requests. The front end serves them as text (GET
/v1/metrics on a dispatcher); the controller scrapes each running job's and republishes them on
its own /metrics labelled by the job's name (controller/export.py). Torch-free.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "infscaled:"
LABEL = "model_name"
# vLLM's bucket edges (seconds), so dashboards built for it read these the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort")

Load = Callable[[], tuple[int, int]]  # () -> (requests running, requests waiting)


class _LoadCollector(Collector):
    """num_requests_running / waiting, read from the backend when scraped."""

    def __init__(self, model: str, load: Load) -> None:
        self.model = model
        self.load = load

    def collect(self) -> Iterator[GaugeMetricFamily]:
        running, waiting = self.load()
        for name, value, help_ in (("num_requests_running", running, "Requests generating tokens."),
                                   ("num_requests_waiting", waiting, "Requests waiting to be admitted.")):
            family = GaugeMetricFamily(PREFIX + name, help_, labels=[LABEL])
            family.add_metric([self.model], value)
            yield family


@dataclass
class RequestTimes:
    """One request's clock readings (time.monotonic()), filled in as it goes."""

    arrived: float
    admitted: float = 0.0  # 0: the backend did not say (then: admitted on arrival, if it produced a token)
    first_token: float = 0.0
    last_token: float = 0.0
    tokens: int = 0
    inter_token: list[float] = field(default_factory=list)

    def token(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self.tokens:
            self.inter_token.append(now - self.last_token)
        else:
            self.first_token = now
        self.last_token = now
        self.tokens += 1


class ServingMetrics:
    """The serving series of one model (labelled `model_name`)."""

    def __init__(self, model: str, load: Load) -> None:
        self.model = model
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_LoadCollector(model, load))

        def hist(name: str, help_: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, help_, [LABEL], buckets=buckets, registry=self.registry)

        def counter(name: str, help_: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, help_, [LABEL, *labels], registry=self.registry)

        self.ttft = hist("time_to_first_token_seconds", "Time from arrival to the first generated token.",
                         TTFT_BUCKETS).labels(model)
        self.itl = hist("inter_token_latency_seconds", "Time between two generated tokens of a request.",
                        ITL_BUCKETS).labels(model)
        self.e2e = hist("e2e_request_latency_seconds", "Time from arrival to the last token.",
                        REQUEST_BUCKETS).labels(model)
        self.decode = hist("request_decode_time_seconds", "Time from the first token to the last.",
                           REQUEST_BUCKETS).labels(model)
        self.queue = hist("request_queue_time_seconds", "Time from arrival to admission (waiting for KV room).",
                          REQUEST_BUCKETS).labels(model)
        self.prefill = hist("request_prefill_time_seconds", "Time from admission to the first token.",
                            REQUEST_BUCKETS).labels(model)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of accepted requests.").labels(model)
        self.generation_tokens = counter("generation_tokens", "Tokens generated.").labels(model)
        success = counter("request_success", "Requests finished, by finish reason (abort: the client left).",
                          ("finished_reason",))
        self.success = {reason: success.labels(model, reason) for reason in FINISH_REASONS}

    def accepted(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def finished(self, times: RequestTimes, reason: str, now: float | None = None) -> None:
        """A request ended: `reason` is stop, length or abort. Token counts and inter-token gaps
        are recorded for every request; queue time for every admitted one (never admitted: the
        client left while it waited); the other latencies only for those that produced a token."""
        now = time.monotonic() if now is None else now
        self.generation_tokens.inc(times.tokens)
        for gap in times.inter_token:
            self.itl.observe(gap)
        admitted = times.admitted or (times.arrived if times.tokens else 0.0)
        if admitted:
            self.queue.observe(admitted - times.arrived)
        if times.tokens:
            self.prefill.observe(times.first_token - admitted)
            self.ttft.observe(times.first_token - times.arrived)
            self.decode.observe(times.last_token - times.first_token)
            self.e2e.observe(now - times.arrived)
        self.success[reason if reason in self.success else "abort"].inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
