"""Prometheus metrics and the per-request log line (PROGRESS_LOGS)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from scheduler.request import RequestStream

request_log = logging.getLogger("docoserve.requests")
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
        stats = [e.stats() for e in scheduler.executors] if scheduler is not None else []
        stats = [s for s in stats if "kv_blocks_total" in s]
        if stats:
            total = sum(s["kv_blocks_total"] for s in stats)
            usage.add_metric([self._model_name], sum(s["kv_blocks_used"] for s in stats) / total)
            queries.add_metric([self._model_name], sum(s["prefix_cache_queries"] for s in stats))
            hits.add_metric([self._model_name], sum(s["prefix_cache_hits"] for s in stats))
        yield from (usage, queries, hits)


class Metrics:
    def __init__(self, scheduler_ref, model_name: str = "model") -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "docoserve_requests", "Finished requests", ["endpoint", "status"], registry=self.registry
        )
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
        self.registry.register(_ReplicaCollector(scheduler_ref, model_name))

    def render(self) -> bytes:
        return generate_latest(self.registry)

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


def log_request(
    endpoint: str,
    status: int,
    request_id: str,
    started: float,
    stream: RequestStream | None,
    error: str | None = None,
) -> None:
    """The seed's vLLM-like line, e.g.
    [req] chat 200 id=... latency=0.532s gen=0.471s tokens: prompt=45 completion=128 total=173 tps=271.7 ..."""
    latency = time.monotonic() - started
    if stream is None:
        request_log.info(
            '[req] %s %d id=%s latency=%.3fs error="%s"', endpoint, status, request_id, latency, error or ""
        )
        return
    params = stream.request.params
    first = stream.first_token_at or time.monotonic()
    end = stream.finished_at or time.monotonic()
    gen = max(end - first, 1e-9)
    completion = stream.completion_tokens
    images = (
        f" images={stream.num_images} image_tokens={stream.num_image_tokens}" if stream.num_images else ""
    )
    request_log.info(
        "[req] %s %d id=%s latency=%.3fs ttft=%.3fs gen=%.3fs tokens: prompt=%d completion=%d total=%d tps=%.1f%s "
        "do_sample=%s temp=%s top_p=%s seed=%s replica=%s%s",
        endpoint,
        status,
        request_id,
        latency,
        first - started,
        gen,
        stream.prompt_tokens,
        completion,
        stream.prompt_tokens + completion,
        completion / gen,
        images,
        str(not params.is_greedy).lower(),
        params.temperature,
        params.top_p,
        params.seed,
        stream.replica_name,
        f' error="{error}"' if error else "",
    )
