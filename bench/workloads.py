"""The benchmark workloads: each is a named set of `LoadConfig` fields and the servers it runs on."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    load: dict  # LoadConfig fields
    servers: tuple[str, ...] = ("ours", "base", "peer", "llamacpp")  # base: ours from another checkout
    repeatable: bool = True


def text_workloads(quick: bool) -> list[Workload]:
    n = 16 if quick else 64
    common = {"max_tokens": 64, "prompt_tokens": 32, "ignore_eos": True, "temperature": 0.0}
    return [
        Workload(
            "sequential",
            "reference: one request at a time, 64 tokens, greedy, non-stream",
            {**common, "concurrency": 1, "requests": 2 if quick else 4},
        ),
        Workload(
            "a_throughput",
            f"(a) {n} requests, 16 in flight, 64 tokens each, greedy, no EOS, non-stream: completion tok/s",
            {**common, "concurrency": 16, "requests": n},
        ),
        Workload(
            "a_hog",
            "(a) beside a process burning 16% of one core in 10 ms bursts (bench.hog), about what the "
            "openai client takes reading (b): what a neighbour's CPU alone costs the server",
            {**common, "concurrency": 16, "requests": n, "hog": 0.16},
            servers=("ours", "base", "llamacpp"),
        ),
        Workload(
            "b_stream",
            "(b) as (a) with stream: TTFT = time to the first non-empty content delta",
            {**common, "concurrency": 16, "requests": n, "stream": True},
        ),
        Workload(
            "b_stream_lean",
            "(b) read as bytes, not parsed event by event (bench.lean_stream): the server's own cost of streaming",
            {**common, "concurrency": 16, "requests": n, "stream": True, "client": "lean"},
        ),
        Workload(
            "c_mixed",
            "(c) 8 requests of 8 tokens sent together with 8 of 128 tokens, stream: short p50 / long p50",
            {**common, "concurrency": 16, "mixed": ((8, 8), (128, 8)), "stream": True},
        ),
    ]


def image_workload(quick: bool) -> Workload:
    return Workload(
        "image",
        "16 concurrent image+text requests (synthetic 64x64 PNG data URL), 32 tokens, stream",
        {"concurrency": 16, "requests": 16, "max_tokens": 32, "prompt_tokens": 16, "ignore_eos": True,
         "stream": True, "image": "synthetic"},
        servers=("ours",),
        repeatable=not quick,
    )  # fmt: skip


def warmup_workload(image: str | None, stream: bool) -> Workload:
    # Not measured: first requests pay for lazy init (the peer builds its CB manager on the first one).
    return Workload(
        "warmup",
        "not measured",
        {"concurrency": 16, "requests": 16, "max_tokens": 16, "prompt_tokens": 32, "ignore_eos": True,
         "image": image, "stream": stream},
    )  # fmt: skip
