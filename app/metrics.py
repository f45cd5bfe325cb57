"""Prometheus metrics (the per-request log line is `app.access_log`'s)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from app.vllm_metrics import VllmRequestMetrics

if TYPE_CHECKING:
    from scheduler.request import RequestStream

# The `method` label takes these and "other": the request line's method is the client's to choose,
# and a label value per invented method would let anyone, without a key, grow /metrics without end.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"})
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _ReplicaCollector:
    def __init__(self, scheduler_ref, model_name: str) -> None:
        self._scheduler_ref = scheduler_ref
        self._model_name = model_name

    def collect(self) -> Iterable[GaugeMetricFamily]:
        scheduler = self._scheduler_ref()
        yield from self._kv_cache(scheduler)
        running = GaugeMetricFamily(
            "docoserve_running_requests", "Requests in a replica's batch", labels=["replica"]
        )
        queued = GaugeMetricFamily(
            "docoserve_queued_requests", "Requests waiting for a batch slot", labels=["replica"]
        )
        ready = GaugeMetricFamily(
            "docoserve_replica_ready", "1 when the replica serves requests", labels=["replica"]
        )
        if scheduler is not None:
            for e in scheduler.executors:
                running.add_metric([e.name], e.num_running)
                queued.add_metric([e.name], e.queue_depth)
                ready.add_metric([e.name], 1.0 if e.is_ready else 0.0)
        hits = CounterMetricFamily(
            "docoserve_image_decode_cache_hits", "Images served from the decoded-image cache"
        )
        misses = CounterMetricFamily("docoserve_image_decode_cache_misses", "Images decoded")
        if scheduler is not None:
            hits.add_metric([], scheduler.image_cache.hits)
            misses.add_metric([], scheduler.image_cache.misses)
        yield from (running, queued, ready, hits, misses)

    def _kv_cache(self, scheduler) -> Iterable[GaugeMetricFamily]:
        """vLLM's names, so dashboards and gateways built for vLLM read them unchanged."""
        labels = ["model_name"]
        running = GaugeMetricFamily(
            "vllm:num_requests_running", "Number of requests in model execution batches.", labels=labels
        )
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                                    labels=labels)  # fmt: skip
        if scheduler is not None:
            running.add_metric([self._model_name], sum(e.num_running for e in scheduler.executors))
            waiting.add_metric([self._model_name], sum(e.queue_depth for e in scheduler.executors))
        yield from (running, waiting)
        usage = GaugeMetricFamily(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels=labels
        )
        queries = CounterMetricFamily(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            labels=labels,
        )
        hits = CounterMetricFamily(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", labels=labels
        )
        # A climbing count says the KV pool is too small for the load: raise KV_CACHE_MAX_GIB (CPU) or
        # KV_CACHE_GPU_FRACTION before users notice the recomputed prompts' latency.
        preemptions = CounterMetricFamily(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine.", labels=labels
        )
        stats = [e.stats() for e in scheduler.executors] if scheduler is not None else []
        stats = [s for s in stats if "kv_blocks_total" in s]
        if stats:
            total = sum(s["kv_blocks_total"] for s in stats)
            usage.add_metric([self._model_name], sum(s["kv_blocks_used"] for s in stats) / total)
            queries.add_metric([self._model_name], sum(s["prefix_cache_queries"] for s in stats))
            hits.add_metric([self._model_name], sum(s["prefix_cache_hits"] for s in stats))
            preemptions.add_metric([self._model_name], sum(s["preemptions"] for s in stats))
        yield from (usage, queries, hits, preemptions)


class Metrics:
    def __init__(self, scheduler_ref, model_name: str = "model") -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "docoserve_requests", "Finished requests", ["endpoint", "status"], registry=self.registry
        )
        # Every HTTP request by route and status, refused ones (400, 401, 413, 429) included.
        self.http_requests = Counter(
            "docoserve_http_requests", "HTTP requests answered", ["method", "route", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "docoserve_request_latency_seconds",
            "End-to-end latency",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "docoserve_time_to_first_token_seconds",
            "Time to first token",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "docoserve_prompt_tokens", "Prompt tokens processed", registry=self.registry
        )
        self.completion_tokens = Counter(
            "docoserve_completion_tokens", "Tokens generated", registry=self.registry
        )
        self.vllm = VllmRequestMetrics(self.registry, model_name)
        self.registry.register(_ReplicaCollector(scheduler_ref, model_name))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def count_http(self, method: str, route: str, status: int) -> None:
        method = method if method in HTTP_METHODS else "other"
        self.http_requests.labels(method, route, str(status)).inc()

    def observe(
        self, endpoint: str, status: int, started: float, stream: RequestStream | None = None
    ) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(time.monotonic() - started)
        if stream is not None:
            self.prompt_tokens.inc(stream.prompt_tokens)
            self.completion_tokens.inc(stream.completion_tokens)
            if stream.first_token_at is not None:
                self.ttft.labels(endpoint).observe(stream.first_token_at - started)
            self.vllm.observe(stream, started, time.monotonic())
