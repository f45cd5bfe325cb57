"""Engine targets measured against our own server: prefix caching, paging, n above the batch.

    python -m bench.engine [--only prefix,paging,n,memory] [--model-path bench/models/bench-80m]

- prefix: 16 concurrent streamed requests sharing a 1,024-token system prompt, each with its own
  32-token user turn and 64 new tokens; the same server with --no-enable-prefix-caching in the
  same run. TTFT p50, throughput, and the prefix-cache hit rate from /health.
- paging: --kv-cache-max-gib 0.25; one 4,000-token prompt and fifteen 100-token prompts sent
  together, 64 new tokens each. When each started and finished, and the KV blocks in use against
  the tokens the running sequences hold, sampled from /health.
- n: --max-batch-size 4; a request with n=16 sent next to four ordinary streamed requests: how long
  until it is answered (and how), and whether the others complete.
- memory: the server's RSS (all its processes) after ordinary traffic, right after a 4,000-token
  prompt (--max-prefill-tokens 2048: two big chunks), and once the replica has gone idle.

Prints one JSON line per scenario and writes them to bench/results/<timestamp>-engine.json.
Every server is stopped in a finally; every request has a time bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from bench.build_model import DEFAULT_MODEL_DIR, build_bench_model
from bench.load import percentile
from bench.ours import our_server
from bench.synthetic import load_tokenizer, synthetic_prompt

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
TIMEOUT_S = 600.0


async def _stream_chat(
    client: httpx.AsyncClient, target, messages: list[dict], max_tokens: int, **extra
) -> dict:
    """One streamed chat request: send time, first content time, end time, usage or error."""
    body = {"model": target.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **extra}  # fmt: skip
    out: dict = {
        "sent": time.perf_counter(),
        "first": None,
        "end": None,
        "completion_tokens": 0,
        "error": None,
    }
    headers = {"Authorization": f"Bearer {target.api_key}"}
    try:
        async with client.stream(
            "POST", f"{target.base_url}/chat/completions", json=body, headers=headers
        ) as response:
            if response.status_code != 200:
                out["error"] = f"{response.status_code}: {(await response.aread()).decode()[:300]}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        out["error"] = chunk["error"].get("message")
                    for choice in chunk.get("choices", []):
                        if choice.get("delta", {}).get("content") and out["first"] is None:
                            out["first"] = time.perf_counter()
                    if chunk.get("usage"):
                        out["completion_tokens"] = chunk["usage"]["completion_tokens"]
                        out["prompt_tokens"] = chunk["usage"]["prompt_tokens"]
    except httpx.HTTPError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["end"] = time.perf_counter()
    return out


async def _health(client: httpx.AsyncClient, target) -> dict:
    return (await client.get(target.health_url)).json()["replicas"][0]


def _server(model_path: Path, stamp: str, name: str, args: tuple[str, ...]):
    return our_server(
        model_path, "bench", extra_args=args, log_path=RESULTS_DIR / f"{stamp}-engine-{name}.log"
    )


async def _prefix_run(target, system: str, users: list[str]) -> dict:
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        # Warm-up with an unrelated prompt: nothing of the measured prefix is cached before the run.
        await _stream_chat(client, target, [{"role": "user", "content": "warm up"}], 8)
        before = await _health(client, target)
        start = time.perf_counter()
        results = await asyncio.gather(*(
            _stream_chat(client, target, [{"role": "system", "content": system}, {"role": "user", "content": u}], 64)
            for u in users
        ))  # fmt: skip
        wall = time.perf_counter() - start
        after = await _health(client, target)
    ttfts = [r["first"] - r["sent"] for r in results if r["first"] is not None]
    tokens = sum(r["completion_tokens"] for r in results)
    queries = after.get("prefix_cache_queries", 0) - before.get("prefix_cache_queries", 0)
    hits = after.get("prefix_cache_hits", 0) - before.get("prefix_cache_hits", 0)
    return {
        "errors": [r["error"] for r in results if r["error"]],
        "ttft_p50_s": round(percentile(ttfts, 50), 4),
        "ttft_p95_s": round(percentile(ttfts, 95), 4),
        "completion_tok_s": round(tokens / wall, 2),
        "wall_s": round(wall, 3),
        "prefix_cache_hit_rate": round(hits / queries, 4) if queries else None,
    }


def scenario_prefix(model_path: Path, stamp: str) -> dict:
    tokenizer = load_tokenizer(str(model_path))
    system = synthetic_prompt(10_000, 1024, tokenizer)
    users = [synthetic_prompt(i, 32, tokenizer) for i in range(16)]
    out = {"scenario": "prefix"}
    for name, flags in (("caching", ()), ("no_caching", ("--no-enable-prefix-caching",))):
        server, target = _server(model_path, stamp, f"prefix-{name}", flags)
        with server:
            out[name] = asyncio.run(_prefix_run(target, system, users))
    out["ttft_p50_ratio"] = round(out["caching"]["ttft_p50_s"] / out["no_caching"]["ttft_p50_s"], 4)
    out["throughput_ratio"] = round(
        out["caching"]["completion_tok_s"] / out["no_caching"]["completion_tok_s"], 3
    )
    return out


async def _paging_run(target, long_prompt: str, short_prompts: list[str]) -> dict:
    samples: list[dict] = []
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                samples.append(await _health(client, target))
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        start = time.perf_counter()
        messages = [[{"role": "user", "content": p}] for p in [long_prompt, *short_prompts]]
        results = await asyncio.gather(*(_stream_chat(client, target, m, 64) for m in messages))
        stop.set()
        await sampler
    long, shorts = results[0], results[1:]
    errors = [r["error"] for r in results if r["error"]]
    if errors:
        return {"errors": errors}
    per_block_bytes = None
    ratios, bound_ratios = [], []
    for s in samples:
        if s.get("kv_tokens_live"):
            used = s["kv_blocks_used"] * s["kv_block_size"]
            ratios.append(used / s["kv_tokens_live"])
            bound_ratios.append(used / s["kv_tokens_live_in_blocks"])
            per_block_bytes = s["kv_pool_bytes"] / (s["kv_blocks_total"] + 1)
    peak = max(samples, key=lambda s: s.get("kv_blocks_used", 0))
    rel = lambda t: round(t - start, 3)  # noqa: E731
    return {
        "errors": [r["error"] for r in results if r["error"]],
        "long": {
            "prompt_tokens": long["prompt_tokens"],
            "first_token_s": rel(long["first"]),
            "finished_s": rel(long["end"]),
            "tokens": long["completion_tokens"],
        },  # fmt: skip
        "short_prompt_tokens": shorts[0]["prompt_tokens"],
        "shorts_first_token_max_s": max(rel(r["first"]) for r in shorts),
        "shorts_finished_max_s": max(rel(r["end"]) for r in shorts),
        "shorts_finished_before_long": all(r["end"] < long["end"] for r in shorts),
        "shorts_started_before_long_finished": all(r["first"] < long["end"] for r in shorts),
        "pool_blocks": peak["kv_blocks_total"],
        "block_size": peak["kv_block_size"],
        "pool_gib": round(peak["kv_pool_bytes"] / 2**30, 3),
        "bytes_per_block": per_block_bytes,
        "peak_blocks_used": peak["kv_blocks_used"],
        "peak_tokens_live": peak["kv_tokens_live"],
        # KV in use against the live tokens, and against the live tokens rounded up to blocks (<= 1).
        "max_used_over_live_ratio": round(max(ratios), 4) if ratios else None,
        "max_used_over_live_in_blocks_ratio": round(max(bound_ratios), 4) if bound_ratios else None,
        "samples": len(ratios),
        "preemptions": samples[-1].get("preemptions") if samples else None,
    }


def scenario_paging(model_path: Path, stamp: str) -> dict:
    tokenizer = load_tokenizer(str(model_path))
    # The chat template adds its own tokens: the rendered prompts come to ~4,000 and ~100 tokens
    # (reported), and the long one's 64 new tokens still fit the bench model's 4,096 context.
    long_prompt = synthetic_prompt(20_000, 3975, tokenizer)
    short_prompts = [synthetic_prompt(i, 75, tokenizer) for i in range(15)]
    server, target = _server(model_path, stamp, "paging", ("--kv-cache-max-gib", "0.25"))
    with server:
        return {"scenario": "paging", **asyncio.run(_paging_run(target, long_prompt, short_prompts))}


async def _n_run(target) -> dict:
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        others = [
            asyncio.create_task(
                _stream_chat(client, target, [{"role": "user", "content": f"ordinary {i}"}], 64)
            )
            for i in range(4)
        ]
        await asyncio.sleep(0.2)
        start = time.perf_counter()
        wide = await client.post(
            f"{target.base_url}/chat/completions",
            headers={"Authorization": f"Bearer {target.api_key}"},
            json={
                "model": target.model,
                "messages": [{"role": "user", "content": "sixteen"}],
                "n": 16,
                "max_tokens": 16,
            },
        )
        answered = time.perf_counter() - start
        done = await asyncio.gather(*others)
    return {
        "n16_status": wide.status_code,
        "n16_answered_s": round(answered, 4),
        "n16_message": wide.json().get("error", {}).get("message") if wide.status_code != 200 else None,
        "others_completed": sum(1 for r in done if not r["error"] and r["completion_tokens"] == 64),
        "others_errors": [r["error"] for r in done if r["error"]],
    }


def scenario_n(model_path: Path, stamp: str) -> dict:
    server, target = _server(model_path, stamp, "n", ("--max-batch-size", "4"))
    with server:
        return {"scenario": "n", **asyncio.run(_n_run(target))}


def _rss_mib(pid: int) -> float:
    import psutil  # comes with accelerate

    processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return round(sum(p.memory_info().rss for p in processes) / 2**20, 1)


async def _memory_run(target, pid: int, long_prompt: str) -> dict:
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        for i in range(3):  # the footprint after ordinary traffic
            await _stream_chat(client, target, [{"role": "user", "content": f"short request {i}"}], 16)
        await asyncio.sleep(1.0)
        before = _rss_mib(pid)
        result = await _stream_chat(client, target, [{"role": "user", "content": long_prompt}], 16)
        during_peak = _rss_mib(pid)
        await asyncio.sleep(1.0)  # the replica goes idle and trims
        after = _rss_mib(pid)
    return {"error": result["error"], "prompt_tokens": result.get("prompt_tokens"), "rss_before_mib": before,
            "rss_right_after_mib": during_peak, "rss_idle_after_mib": after, "growth_mib": round(after - before, 1)}  # fmt: skip


def scenario_memory(model_path: Path, stamp: str) -> dict:
    tokenizer = load_tokenizer(str(model_path))
    long_prompt = synthetic_prompt(30_000, 3975, tokenizer)
    server, target = _server(model_path, stamp, "memory", ("--max-prefill-tokens", "2048"))
    with server:
        return {"scenario": "memory", **asyncio.run(_memory_run(target, server.process.pid, long_prompt))}


SCENARIOS = {"prefix": scenario_prefix, "paging": scenario_paging, "n": scenario_n, "memory": scenario_memory}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    parser.add_argument("--model-path", default=str(DEFAULT_MODEL_DIR))
    args = parser.parse_args(argv)
    model_path = build_bench_model(args.model_path)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    lines = []
    for name in args.only.split(","):
        line = SCENARIOS[name.strip()](model_path, stamp)
        lines.append(line)
        print(json.dumps(line), flush=True)
    out = RESULTS_DIR / f"{stamp}-engine.json"
    out.write_text(json.dumps(lines, indent=1))
    print(f"[engine] results in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
