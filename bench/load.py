"""Async load generator for any OpenAI-compatible /v1/chat/completions server.

    python -m bench.load --base-url http://127.0.0.1:8000/v1 --model NAME --concurrency 16 \
        --requests 64 --max-tokens 64 [--stream [--client lean]] [--mixed 8:8,128:8] [--ignore-eos] \
        [--image PATH|synthetic] [--health-url http://127.0.0.1:8000/health] [--timeout 600]

Prints one JSON line. `run_load(LoadConfig(...))` is the same thing as an importable coroutine.
Each result carries `client_cpu_s`, the CPU time of this load generator itself: on a small machine
it competes with the server for the same cores, and a streamed run costs it far more than a
non-streamed one (see bench.lean_stream).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import time
from dataclasses import dataclass, field, fields

import httpx
from openai import AsyncOpenAI

from bench.health import HealthSampler
from bench.hog import cpu_hog
from bench.lean_stream import lean_stream
from bench.synthetic import image_data_url, load_tokenizer, synthetic_prompt

_MAX_ERROR_SAMPLES = 5


@dataclass(frozen=True)
class LoadConfig:
    base_url: str
    model: str
    api_key: str = "EMPTY"
    server: str = ""
    concurrency: int = 16
    requests: int = 64
    prompt_tokens: int = 32
    max_tokens: int = 64
    stream: bool = False
    # ((max_tokens, count), ...): every class is sent at once; overrides `requests` and `max_tokens`.
    mixed: tuple[tuple[int, int], ...] = ()
    ignore_eos: bool = False
    temperature: float = 0.0
    image: str | None = None
    health_url: str | None = None
    health_interval_s: float = 0.05
    timeout: float = 600.0
    # Server-specific knobs, e.g. transformers serve rejects `ignore_eos` but takes `generation_config`.
    extra_body: dict = field(default_factory=dict)
    include_usage: bool = True
    # Model folder or tokenizer.json: cuts each prompt to exactly `prompt_tokens` of that vocabulary.
    tokenizer: str | None = None
    # How streams are read: "openai" (the SDK, an event at a time) or "lean" (bytes; bench.lean_stream).
    client: str = "openai"
    # Share of one core a process burns beside the load (bench.hog); 0: none.
    hog: float = 0.0
    # Picks the prompts' text; None: a fresh one per run, so that a run never finds the prompts of
    # the run before it (the same workload's last repeat) in the server's prefix cache.
    prompt_salt: int | None = None


@dataclass
class _Outcome:
    max_tokens: int
    latency_s: float | None = None
    ttft_s: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None


def _request_plan(cfg: LoadConfig) -> list[int]:
    """max_tokens of each request, in send order."""
    if not cfg.mixed:
        return [cfg.max_tokens] * cfg.requests
    # Interleave the classes so that no class gets a head start in the server's queue.
    queues = [[max_tokens] * count for max_tokens, count in cfg.mixed]
    plan: list[int] = []
    while any(queues):
        plan.extend(q.pop() for q in queues if q)
    return plan


def _messages(text: str, image_url: str | None) -> list[dict]:
    if image_url is None:
        return [{"role": "user", "content": text}]
    content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


async def _one_request(
    client: AsyncOpenAI,
    cfg: LoadConfig,
    prompt: str,
    max_tokens: int,
    image_url: str | None,
    lean: httpx.AsyncClient | None = None,
) -> _Outcome:
    out = _Outcome(max_tokens=max_tokens)
    extra_body = dict(cfg.extra_body)
    if cfg.ignore_eos:
        extra_body["ignore_eos"] = True
    kwargs = {
        "model": cfg.model,
        "messages": _messages(prompt, image_url),
        "max_tokens": max_tokens,
        "temperature": cfg.temperature,
        "extra_body": extra_body or None,
    }
    start = time.perf_counter()
    try:
        if cfg.stream and lean is not None:
            body = {k: v for k, v in kwargs.items() if k != "extra_body"} | extra_body
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            await lean_stream(lean, f"{cfg.base_url}/chat/completions", body, out)
        elif cfg.stream:
            stream_options = {"include_usage": True} if cfg.include_usage else None
            stream = await client.chat.completions.create(
                **kwargs, stream=True, stream_options=stream_options
            )
            content_chunks = 0
            async for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        content_chunks += 1
                        if out.ttft_s is None:
                            out.ttft_s = time.perf_counter() - start
                    out.finish_reason = choice.finish_reason or out.finish_reason
                if chunk.usage is not None:
                    out.completion_tokens = chunk.usage.completion_tokens
                    out.prompt_tokens = chunk.usage.prompt_tokens
            # Without usage, one content delta is taken as one token: servers emit one per step.
            out.completion_tokens = out.completion_tokens or content_chunks
        else:
            response = await client.chat.completions.create(**kwargs)
            if response.usage is not None:
                out.completion_tokens = response.usage.completion_tokens
                out.prompt_tokens = response.usage.prompt_tokens
            out.finish_reason = response.choices[0].finish_reason if response.choices else None
        out.latency_s = time.perf_counter() - start
        if not cfg.stream:
            out.ttft_s = out.latency_s
    except Exception as exc:  # noqa: BLE001 - every failure is a measured outcome, never a crash
        out.error = f"{type(exc).__name__}: {exc}"[:300]
    return out


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks; q in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _summarize(
    cfg: LoadConfig,
    outcomes: list[_Outcome],
    wall_s: float,
    health: HealthSampler | None,
    client_cpu_s: float,
) -> dict:
    ok = [o for o in outcomes if o.error is None]
    errors = [o.error for o in outcomes if o.error is not None]
    tokens = sum(o.completion_tokens for o in ok)
    latencies = [o.latency_s for o in ok]
    ttfts = [o.ttft_s for o in ok if o.ttft_s is not None]
    prompt_tokens = [o.prompt_tokens for o in ok if o.prompt_tokens is not None]
    finish: dict[str, int] = {}
    for o in ok:
        finish[str(o.finish_reason)] = finish.get(str(o.finish_reason), 0) + 1
    mode = (
        ("mixed" if cfg.mixed else "fixed")
        + ("-stream" if cfg.stream else "")
        + ("-lean" if cfg.stream and cfg.client == "lean" else "")
        + ("-image" if cfg.image else "")
    )
    result = {
        "server": cfg.server or cfg.base_url,
        "mode": mode,
        "concurrency": cfg.concurrency,
        "requests": len(outcomes),
        "completed": len(ok),
        "errors": len(errors),
        "error_samples": list(dict.fromkeys(errors))[:_MAX_ERROR_SAMPLES],
        "wall_s": _round(wall_s, 3),
        "completion_tokens": tokens,
        "completion_tok_s": _round(tokens / wall_s if wall_s > 0 else 0.0, 2),
        "client_cpu_s": _round(client_cpu_s, 3),
        "latency_p50_s": _round(percentile(latencies, 50)),
        "latency_p95_s": _round(percentile(latencies, 95)),
        "ttft_p50_s": _round(percentile(ttfts, 50)),
        "ttft_p95_s": _round(percentile(ttfts, 95)),
        "health_p50_ms": None,
        "health_p99_ms": None,
        "health_max_ms": None,
        "health_samples": 0,
        "health_errors": 0,
        "max_tokens": cfg.max_tokens,
        "prompt_tokens_target": cfg.prompt_tokens,
        "prompt_tokens_mean": _round(sum(prompt_tokens) / len(prompt_tokens), 1) if prompt_tokens else None,
        "finish_reasons": finish,
        "ignore_eos": cfg.ignore_eos,
        "stream": cfg.stream,
    }
    if health is not None:
        result.update(
            health_p50_ms=_round(percentile(health.latencies_ms, 50), 2),
            health_p99_ms=_round(percentile(health.latencies_ms, 99), 2),
            health_max_ms=_round(max(health.latencies_ms, default=None), 2),
            health_samples=len(health.latencies_ms),
            health_errors=health.errors,
        )
    if cfg.mixed:
        classes = {}
        for max_tokens, _ in cfg.mixed:
            mine = [o for o in ok if o.max_tokens == max_tokens]
            classes[str(max_tokens)] = {
                "completed": len(mine),
                "completion_tokens": sum(o.completion_tokens for o in mine),
                "latency_p50_s": _round(percentile([o.latency_s for o in mine], 50)),
                "ttft_p50_s": _round(percentile([o.ttft_s for o in mine if o.ttft_s is not None], 50)),
            }
        result["mixed"] = [list(pair) for pair in cfg.mixed]
        result["classes"] = classes
        short = classes[str(min(m for m, _ in cfg.mixed))]["latency_p50_s"]
        long = classes[str(max(m for m, _ in cfg.mixed))]["latency_p50_s"]
        result["short_latency_p50_s"], result["long_latency_p50_s"] = short, long
        result["short_long_latency_ratio"] = _round(short / long) if short and long else None
    return result


async def run_load(cfg: LoadConfig) -> dict:
    """Send every planned request (at most `concurrency` in flight), bounded by `cfg.timeout` overall."""
    plan = _request_plan(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    salt = cfg.prompt_salt if cfg.prompt_salt is not None else random.SystemRandom().randrange(10**5, 10**6)
    prompts = [synthetic_prompt(i, cfg.prompt_tokens, tokenizer, salt) for i in range(len(plan))]
    image_url = image_data_url(cfg.image) if cfg.image else None
    semaphore = asyncio.Semaphore(max(1, cfg.concurrency))
    client = AsyncOpenAI(base_url=cfg.base_url, api_key=cfg.api_key, max_retries=0, timeout=cfg.timeout)
    headers = {"Authorization": f"Bearer {cfg.api_key}"}
    lean = httpx.AsyncClient(timeout=cfg.timeout, headers=headers) if cfg.client == "lean" else None

    async def bounded(index: int, max_tokens: int) -> _Outcome:
        async with semaphore:
            return await _one_request(client, cfg, prompts[index], max_tokens, image_url, lean)

    health = HealthSampler(cfg.health_url, cfg.health_interval_s, headers) if cfg.health_url else None
    try:
        with health or contextlib.nullcontext(), cpu_hog(cfg.hog) as hog:
            cpu_before = _cpu_s()
            start = time.perf_counter()
            tasks = [asyncio.create_task(bounded(i, m)) for i, m in enumerate(plan)]
            done, pending = await asyncio.wait(tasks, timeout=cfg.timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            wall_s = time.perf_counter() - start
            client_cpu_s = _cpu_s() - cpu_before
    finally:
        await client.close()
        if lean is not None:
            await lean.aclose()
    outcomes = [
        t.result() if t in done else _Outcome(max_tokens=m, error=f"timeout after {cfg.timeout}s")
        for t, m in zip(tasks, plan, strict=True)
    ]
    return {**_summarize(cfg, outcomes, wall_s, health, client_cpu_s), **hog, "prompt_salt": salt}


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def parse_mixed(text: str) -> tuple[tuple[int, int], ...]:
    """'8:8,128:8' -> ((8, 8), (128, 8)): MAX_TOKENS:COUNT pairs."""
    pairs = []
    for part in text.split(","):
        max_tokens, count = part.split(":")
        pairs.append((int(max_tokens), int(count)))
    return tuple(pairs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True, help="the `model` field to send")
    p.add_argument("--api-key", default="EMPTY")
    p.add_argument("--server", default="", help="label for the JSON line (defaults to the base URL)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--client", choices=("openai", "lean"), default="openai", help="how streams are read")
    p.add_argument(
        "--hog", type=float, default=0.0, help="share of one core burnt beside the load (bench.hog)"
    )
    p.add_argument("--mixed", type=parse_mixed, default=(), help="MAX_TOKENS:COUNT,... sent all at once")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: true in the body")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--image", default=None, help="image file, or 'synthetic', sent as a base64 data URL")
    p.add_argument("--health-url", default=None, help="polled every ~50 ms while the load runs")
    p.add_argument("--timeout", type=float, default=600.0, help="bound on the whole run, in seconds")
    p.add_argument("--extra-body", type=json.loads, default={}, help="JSON object merged into every body")
    p.add_argument("--tokenizer", default=None, help="model folder or tokenizer.json for exact prompt length")
    p.add_argument(
        "--prompt-salt",
        type=int,
        default=None,
        help="repeat the prompts of the run that printed this salt (default: fresh prompts every run)",
    )
    p.add_argument("--no-stream-usage", action="store_true", help="do not send stream_options.include_usage")
    return p


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    given = {f.name: getattr(args, f.name) for f in fields(LoadConfig) if hasattr(args, f.name)}
    return LoadConfig(**given, include_usage=not args.no_stream_usage)


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(asyncio.run(run_load(config_from_args(build_parser().parse_args(argv))))), flush=True)


if __name__ == "__main__":
    main()
