"""Multi-turn conversations over several replicas: prefix-cache hits with the router's prefix
affinity (as served) and with load alone (`scheduler.affinity` switched off), alternating rounds.

    python -m bench.affinity [--model builtin:tiny] [--replicas 2] [--conversations 8] [--turns 5]
                             [--concurrency 8] [--max-tokens 48] [--rounds 2]

In process (the real Scheduler and executors, no HTTP): each conversation sends its history plus
a new user message of ~60 words, greedy, `--max-tokens` new tokens, and keeps the answer in its
history; with every conversation in flight at once the replicas stay busy, so load alone spreads
a conversation's turns over them.
Every round starts fresh conversations (no cache carried over). Reports, per mode, the share of
prompt tokens found in a prefix cache, the mean time to first token and the wall time. Prints one
JSON line per round and writes them to bench/results/<timestamp>-affinity.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import anyio

import scheduler.core as core
from bench.server import write_results
from models.params import PromptInput, SamplingParams
from scheduler.core import Scheduler
from scheduler.request import EngineRequest
from tests.unit.configs import engine_config

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november".split()


def user_message(conversation: int, turn: int, round_: int) -> str:
    words = [WORDS[(conversation * 7 + turn * 3 + i) % len(WORDS)] for i in range(60)]
    return f"round {round_} conversation {conversation} turn {turn}: " + " ".join(words)


async def run_round(scheduler: Scheduler, args, round_: int) -> dict:
    limiter = anyio.Semaphore(args.concurrency)
    prompt_tokens = cached_tokens = earlier_turns = 0
    ttfts: list[float] = []
    counter = 0

    async def conversation(index: int) -> None:
        nonlocal prompt_tokens, cached_tokens, earlier_turns, counter
        history: list[dict] = []
        before = 0  # the previous turn's prompt and answer: what this turn's prompt starts with
        for turn in range(args.turns):
            history.append({"role": "user", "content": user_message(index, turn, round_)})
            counter += 1
            request = EngineRequest(
                f"c{index}-t{turn}-r{round_}-{counter}",
                PromptInput(messages=tuple(history)),
                SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True),
            )
            async with limiter:
                started = time.monotonic()
                stream = await scheduler.submit(request)
                text, first = "", None
                async for update in stream:
                    if first is None and any(c.token_ids for c in update.choices):
                        first = time.monotonic()
                    text += "".join(c.text for c in update.choices)
            ttfts.append((first or time.monotonic()) - started)
            prompt_tokens += stream.prompt_tokens
            cached_tokens += stream.cached_tokens
            earlier_turns += before
            before = stream.prompt_tokens + stream.completion_tokens
            history.append({"role": "assistant", "content": text})

    started = time.monotonic()
    async with anyio.create_task_group() as group:
        for index in range(args.conversations):
            group.start_soon(conversation, index)
    return {
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached_tokens,
        "hit_rate": round(cached_tokens / max(1, prompt_tokens), 4),
        # The most a cache could hold: each turn's prompt starts with the turn before and its answer.
        "earlier_turns_share": round(earlier_turns / max(1, prompt_tokens), 4),
        "mean_ttft_ms": round(1000 * statistics.mean(ttfts), 2),
        "wall_s": round(time.monotonic() - started, 3),
    }


async def main(args) -> list[dict]:
    config = engine_config(
        args.model,
        cpu_replicas=args.replicas,
        max_input_tokens=8192,
        default_max_tokens=max(64, args.max_tokens),
        max_batch_size=8,
        max_queue_size=256,
    )
    scheduler = Scheduler(config)
    await scheduler.start()
    with anyio.fail_after(600):
        while scheduler.status == "loading":
            await anyio.sleep(0.1)
    served = core.cached_prompt_tokens
    rows = []
    try:
        for round_ in range(args.rounds):
            for mode in ("affinity", "load-only"):
                core.cached_prompt_tokens = served if mode == "affinity" else (lambda prepared, executors: {})
                row = {
                    "mode": mode,
                    "round": round_,
                    **await run_round(scheduler, args, 2 * round_ + len(rows)),
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        core.cached_prompt_tokens = served
        await scheduler.drain(5)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    arguments = parser.parse_args()
    results = anyio.run(main, arguments)
    print(write_results("affinity", [{"args": vars(arguments)}, *results]))
