"""The inter-token latency histogram takes many equal observations in one call and exports
exactly what prometheus_client's own Histogram would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from app.vllm_metrics import _WeightedHistogram


def _series(text: str, name: str) -> list[str]:
    return [
        line.replace(name, "X")
        for line in text.splitlines()
        if line.startswith(name) and "created" not in line
    ]


def test_weighted_observations_match_one_by_one_observations():
    registry = CollectorRegistry()
    weighted = _WeightedHistogram("vllm:itl_seconds", "doc", "m", (0.01, 0.1, 1.0))
    registry.register(weighted)
    plain = Histogram("plain_seconds", "doc", ["model_name"], buckets=(0.01, 0.1, 1.0), registry=registry)
    for value, count in ((0.005, 3), (0.05, 2), (0.1, 1), (5.0, 4)):
        weighted.observe(value, count)
        for _ in range(count):
            plain.labels("m").observe(value)
    text = generate_latest(registry).decode()
    mine, theirs = _series(text, "vllm:itl_seconds"), _series(text, "plain_seconds")
    assert mine == theirs and len(mine) == 6  # four buckets, count, sum
