"""Request metrics under vLLM's names and types, so dashboards, autoscalers (prometheus-adapter,
KEDA) and inference gateways built for vLLM read this server unchanged. Every series carries
`model_name`. Timings per request: queue (arrival to first scheduled), prefill (scheduled to first
token), decode (first to last token), inter-token latency (per token, at step granularity: a step
that delivers k tokens counts k intervals of its time / k), end to end, time to first token.
"""

from __future__ import annotations

import bisect
import threading
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from scheduler.request import RequestStream

# vLLM's buckets for request-level latencies and for time to first token / between tokens.
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)  # fmt: skip


class VllmRequestMetrics:
    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        self.model_name = model_name
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=registry)

        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", labels,
                                     registry=registry)  # fmt: skip
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                         labels, registry=registry)  # fmt: skip
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               ["model_name", "finished_reason"], registry=registry)  # fmt: skip
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              _TTFT_BUCKETS)  # fmt: skip
        self.itl = _WeightedHistogram("vllm:inter_token_latency_seconds",
                                      "Histogram of inter-token latency in seconds.", model_name, _ITL_BUCKETS)  # fmt: skip
        registry.register(self.itl)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.", _REQUEST_BUCKETS)  # fmt: skip
        self.queue = histogram("vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.", _REQUEST_BUCKETS)  # fmt: skip
        self.prefill = histogram("vllm:request_prefill_time_seconds",
                                 "Histogram of time spent in PREFILL phase for request.", _REQUEST_BUCKETS)  # fmt: skip
        self.decode = histogram("vllm:request_decode_time_seconds",
                                "Histogram of time spent in DECODE phase for request.", _REQUEST_BUCKETS)  # fmt: skip

    def observe(self, stream: RequestStream, arrived: float, ended: float) -> None:
        """A finished generation request (`arrived`/`ended`: monotonic seconds)."""
        model = self.model_name
        self.prompt_tokens.labels(model).inc(stream.prompt_tokens)
        self.generation_tokens.labels(model).inc(stream.completion_tokens)
        for reason in stream.finish_reasons:
            # vLLM counts stop, length and abort; an engine error is not a success.
            if reason in ("stop", "length", "abort", "tool_calls"):
                self.success.labels(model, "stop" if reason == "tool_calls" else reason).inc()
        self.e2e.labels(model).observe(max(0.0, ended - arrived))
        scheduled, first, finished = stream.scheduled_at, stream.first_token_at, stream.finished_at
        if scheduled is not None:
            self.queue.labels(model).observe(max(0.0, scheduled - arrived))
        if first is not None:
            self.ttft.labels(model).observe(max(0.0, first - arrived))
            if scheduled is not None:
                self.prefill.labels(model).observe(max(0.0, first - scheduled))
            if finished is not None:
                self.decode.labels(model).observe(max(0.0, finished - first))
        for interval, count in stream.token_intervals.items():
            self.itl.observe(interval, count)


class _WeightedHistogram:
    """A histogram that takes `count` equal observations in one call: a long answer's
    inter-token latencies are recorded in as many calls as it had distinct intervals, not one per
    token (16,000 calls at once would stall the event loop for milliseconds)."""

    def __init__(self, name: str, documentation: str, model_name: str, buckets: tuple[float, ...]) -> None:
        self.name, self.documentation, self.model_name = name, documentation, model_name
        self.bounds = [*buckets, float("inf")]
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float, count: int = 1) -> None:
        index = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self.counts[index] += count
            self.total += value * count

    def collect(self):
        with self._lock:
            counts, total = list(self.counts), self.total
        family = HistogramMetricFamily(self.name, self.documentation, labels=["model_name"])
        cumulative, running = [], 0
        for bound, count in zip(self.bounds, counts, strict=True):
            running += count
            cumulative.append((floatToGoString(bound), running))
        family.add_metric([self.model_name], cumulative, total)
        yield family
