"""A real Scheduler on a tiny model, in process, for tests that submit EngineRequests to it."""

from __future__ import annotations

import contextlib
import dataclasses

import anyio

from models.params import PromptInput, SamplingParams
from scheduler.core import Scheduler
from scheduler.request import EngineRequest
from tests.unit.configs import engine_config


@contextlib.asynccontextmanager
async def running_scheduler(
    model_path, *, cpu_replicas=1, max_new_tokens=64, kv_budget=None, executor=None, **settings
):
    settings = {
        "max_queue_size": 64,
        "max_batch_size": 8,
        "max_prefill_tokens": 64,
        "max_input_tokens": 200,
        **settings,
    }
    config = engine_config(
        model_path,
        cpu_replicas=cpu_replicas,
        default_max_tokens=max_new_tokens,
        kv_cache_max_gib=(kv_budget or 0) / 2**30,
        **settings,
    )
    if executor:
        config = dataclasses.replace(config, executor=dataclasses.replace(config.executor, **executor))
    scheduler = Scheduler(config)
    await scheduler.start()
    with anyio.fail_after(120):
        while scheduler.status == "loading":
            await anyio.sleep(0.05)
    assert scheduler.status == "ready", scheduler.replica_stats()
    try:
        yield scheduler
    finally:
        await scheduler.drain(5)


def request(i: int, max_tokens: int | None = 8, text: str = "hello", n: int = 1, **params) -> EngineRequest:
    params.setdefault("temperature", 0.0)
    params.setdefault("ignore_eos", True)
    messages = ({"role": "user", "content": f"{text} {i}"},)
    return EngineRequest(
        f"r{i}", PromptInput(messages=messages), SamplingParams(max_tokens=max_tokens, **params), n=n
    )


async def consume(stream) -> str:
    text = ""
    async for update in stream:
        text += "".join(c.text for c in update.choices)
    return text
