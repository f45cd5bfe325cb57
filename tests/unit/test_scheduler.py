"""The scheduler with real tiny models, in-process: admission, lengths, routing, cancellation."""

from __future__ import annotations

import collections
import dataclasses
import time

import anyio
import pytest

from models.params import PromptInput, SamplingParams
from scheduler.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    OverloadedError,
)
from scheduler.request import EngineRequest
from tests.unit.scheduler_harness import consume, request, running_scheduler

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def test_concurrent_requests_complete_with_their_own_lengths(tiny_text_path):
    async with running_scheduler(tiny_text_path) as scheduler:
        streams = [await scheduler.submit(request(i, max_tokens=3 + i)) for i in range(6)]
        async with anyio.create_task_group() as tg:
            for s in streams:
                tg.start_soon(consume, s)
        assert [s.completion_tokens for s in streams] == [3 + i for i in range(6)]
        assert all(s.finished for s in streams)
        assert all(e.outstanding_tokens == 0 for e in scheduler.executors)


async def test_lengths_are_checked_and_the_cap_is_reported(tiny_text_path):
    async with running_scheduler(tiny_text_path, max_new_tokens=16) as scheduler:
        # Past the 4,096-token context but lowered to the cap first (the seed clamps): answered.
        stream = await scheduler.submit(request(0, max_tokens=10_000))
        await consume(stream)
        assert stream.completion_tokens == 16
        assert any("10000 was lowered" in w for w in stream.warnings)
        stream = await scheduler.submit(request(1, max_tokens=40))
        await consume(stream)
        assert stream.completion_tokens == 16
        assert any("lowered" in w for w in stream.warnings)
    async with running_scheduler(tiny_text_path, max_new_tokens=8_000) as scheduler:
        # A cap above the context: what is left after it still has to fit, and the 400 says both numbers.
        with pytest.raises(ContextLengthExceededError) as info:
            await scheduler.submit(request(2, max_tokens=10_000))
        assert info.value.param == "max_tokens" and "4096" in info.value.message
        assert "8000 (lowered from 10000)" in info.value.message
        with pytest.raises(InvalidRequestError):
            await scheduler.submit(request(2, logit_bias={10**6: 1.0}))


async def test_long_prompts_are_left_truncated_and_say_so(tiny_text_path):
    async with running_scheduler(tiny_text_path) as scheduler:
        stream = await scheduler.submit(request(0, text="word " * 400))
        await consume(stream)
        assert stream.prompt_tokens == 200
        assert any("dropped" in w for w in stream.warnings)


async def test_cancelled_requests_free_their_slots(tiny_text_path):
    async with running_scheduler(tiny_text_path, max_new_tokens=512) as scheduler:
        streams = [await scheduler.submit(request(i, max_tokens=500)) for i in range(8)]
        with anyio.fail_after(30):
            while not all(s.completion_tokens for s in streams):  # every one of them is decoding
                await anyio.sleep(0.01)
        for s in streams:
            s.cancel()
        executor = scheduler.executors[0]
        with anyio.fail_after(10):
            while executor.num_running or scheduler._inflight:
                await anyio.sleep(0.02)
        assert not executor.batch.running and executor.batch.blocks.num_used == 0
        assert all(s.completion_tokens < 500 for s in streams)
        short = await scheduler.submit(request(99, max_tokens=4))
        with anyio.fail_after(10):
            await consume(short)
        assert short.completion_tokens == 4


async def test_full_queues_refuse_at_once(tiny_text_path):
    async with running_scheduler(
        tiny_text_path, max_queue_size=1, max_batch_size=1, max_new_tokens=512
    ) as scheduler:
        busy = await scheduler.submit(request(0, max_tokens=400))
        with anyio.fail_after(10):
            while scheduler.executors[0].queue_depth:
                await anyio.sleep(0.01)
        with anyio.fail_after(10):
            while scheduler.executors[0].num_running < 1:  # its row is seen taken
                await anyio.sleep(0.01)
        queued = await scheduler.submit(request(1, max_tokens=400))
        # It waits (one row, taken), whether still in the inbox or in the batch's queue.
        assert scheduler.executors[0].queue_depth == 1
        with pytest.raises(OverloadedError) as info:
            await scheduler.submit(request(2))
        assert info.value.retry_after_s >= 1
        busy.cancel()
        queued.cancel()


async def test_a_burst_into_free_rows_is_not_refused_by_a_small_queue(tiny_text_path):
    """With MAX_QUEUE_SIZE 2, an idle replica of 8 rows refused some of 8 requests sent at once
    (503 "every replica queue is full") because those not yet picked up counted as queued."""
    async with running_scheduler(
        tiny_text_path, max_queue_size=2, max_batch_size=8, max_new_tokens=512
    ) as scheduler:
        # Long answers: none ends (and frees its row) while the burst arrives.
        streams = [
            await scheduler.submit(request(i, max_tokens=500)) for i in range(10)
        ]  # 8 rows + 2 waiting
        with pytest.raises(OverloadedError):
            await scheduler.submit(request(10, max_tokens=500))
        for stream in streams:
            stream.cancel()
        with anyio.fail_after(30):
            for stream in streams:
                await consume(stream)
        assert all(stream.completion_tokens < 500 for stream in streams)


async def test_concurrent_multi_prompt_requests_take_the_room_whole(tiny_text_path):
    """Three 4-prompt requests at once on room for 8 (2 replicas x (2 rows + 2 waiting)): each
    used to place its prompts one await at a time, take part of both replicas, then find no room
    for its last prompt and cancel the rest, so all three could be refused. Two fit, one not."""
    async with running_scheduler(
        tiny_text_path, cpu_replicas=2, max_batch_size=2, max_queue_size=2, max_new_tokens=512
    ) as scheduler:
        outcomes: list = []
        admitted: list = []

        async def one(k: int) -> None:
            # Long answers: none ends (and frees room) while the three arrive.
            try:
                admitted.extend(
                    await scheduler.submit_all([request(10 * k + i, max_tokens=500) for i in range(4)])
                )
            except OverloadedError:
                outcomes.append("refused")
                return
            outcomes.append("admitted")

        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                for k in range(3):
                    group.start_soon(one, k)
            for stream in admitted:
                stream.cancel()
            for stream in admitted:
                await consume(stream)
        assert sorted(outcomes) == ["admitted", "admitted", "refused"]


async def test_a_small_kv_pool_pages_and_preempts_instead_of_overflowing(tiny_text_path):
    # tiny model: 2 layers x 2 kv heads x 16 dims x k+v x fp32 = 512 bytes per token, so a 256 KiB
    # pool holds 512 tokens (32 blocks). Six requests that each grow to ~310 tokens cannot all keep
    # their blocks: the latest arrivals are preempted and recomputed, and every answer is the one
    # it gets alone.
    budget = 512 * 512
    async with running_scheduler(tiny_text_path, max_new_tokens=400, kv_budget=budget) as scheduler:
        executor = scheduler.executors[0]
        with pytest.raises(ContextLengthExceededError) as info:
            await scheduler.submit(request(0, max_tokens=400, text="word " * 150))
        assert "KV cache" in info.value.message and info.value.param == "max_tokens"
        streams = [await scheduler.submit(request(i, max_tokens=300)) for i in range(6)]
        texts = {}

        async def collect(i, stream):
            texts[i] = await consume(stream)

        peak_used, counted = 0, []
        async with anyio.create_task_group() as tg:
            for i, s in enumerate(streams):
                tg.start_soon(collect, i, s)
            while not all(s.finished for s in streams):
                peak_used = max(peak_used, executor.batch.blocks.num_used)
                counted.append(
                    (executor.num_running + executor.queue_depth, sum(not s.finished for s in streams))
                )
                await anyio.sleep(0.005)
        assert all(s.completion_tokens == 300 for s in streams)
        # Preempted sequences that had generated were in neither figure: a replica short of
        # blocks looked free to admission and the router. (A stream ends a step before its row.)
        assert all(held >= unfinished - 1 for held, unfinished in counted), counted
        assert executor.batch.num_preemptions > 0
        assert peak_used <= executor.batch.blocks.num_blocks == 32
        # Plus the null (padding) block and the scratch block of graph steps.
        block_bytes = 2 * 2 * 16 * 2 * 16 * 4
        assert executor.replica.kv_pool_bytes <= budget + 2 * block_bytes
        for i in (0, 5):  # the first and the most preempted, alone
            assert await consume(await scheduler.submit(request(i, max_tokens=300))) == texts[i]


async def test_a_prompt_larger_than_the_kv_pool_is_named_as_the_cause(tiny_text_path):
    # 256 tokens of pool (512 bytes per token); the prompt alone needs more: the prompt is at
    # fault, not max_tokens (which the 400 named).
    async with running_scheduler(tiny_text_path, kv_budget=512 * 256, max_input_tokens=1000) as scheduler:
        with pytest.raises(ContextLengthExceededError) as info:
            await scheduler.submit(request(0, max_tokens=None, text="word " * 300))
        assert "KV cache" in info.value.message and info.value.param == "messages"
        assert "max_tokens (64, the default)" in info.value.message  # the client sent none
        with pytest.raises(ContextLengthExceededError) as info:  # one choice fits; 8 do not
            await scheduler.submit(request(0, max_tokens=64, text="word " * 100, n=4))
        assert info.value.param == "n"
        # What /v1/models reports: the pool's 256 tokens, not the model's context.
        assert scheduler.max_model_len == 256 < scheduler.ready_replica.loaded.max_context


async def test_defaults_are_lowered_to_what_the_kv_pool_holds(tiny_text_path):
    """A default max_tokens is the server's choice: lowered to the pool's room as it is to the
    context's (it was a 400 telling the client to reduce a max_tokens it never sent). A
    completion's own default (16) is one too."""
    async with running_scheduler(tiny_text_path, kv_budget=512 * 256, max_input_tokens=1000) as scheduler:
        executor = scheduler.executors[0]
        for prompt_tokens, n in [(1, 1), (15, 1), (16, 3), (100, 2), (255, 1), (256, 1), (300, 1)]:
            room = executor.max_tokens_that_fit(prompt_tokens, n)
            assert room < 1 or executor.fits(prompt_tokens, room, n)
            assert not executor.fits(prompt_tokens, max(room, 0) + 1, n)
        stream = await scheduler.submit(request(0, max_tokens=None, text="word " * 200))
        await consume(stream)
        assert 0 < stream.completion_tokens < 64
        explicit = request(1, max_tokens=64, text="word " * 200)
        with pytest.raises(ContextLengthExceededError):
            await scheduler.submit(explicit)
        completion = request(2, max_tokens=None, text="word " * 20)
        completion = dataclasses.replace(
            completion, params=dataclasses.replace(completion.params, default_max_tokens=16)
        )
        stream = await scheduler.submit(completion)
        await consume(stream)
        assert stream.completion_tokens == 16 and not stream.warnings


async def test_scoring_may_fill_the_context(tiny_text_path):
    """max_tokens 0 (scoring the prompt, as lm-eval does at its max_length) needs no room after
    the prompt: a prompt of exactly the context's length was a 400."""
    async with running_scheduler(tiny_text_path, max_input_tokens=4096, max_prefill_tokens=4096) as scheduler:
        context = scheduler.ready_replica.loaded.max_context
        ids = tuple(10 + i % 500 for i in range(context))
        scoring = EngineRequest(
            "score",
            PromptInput(token_ids=ids),
            SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=0),
        )
        stream = await scheduler.submit(scoring)
        await consume(stream)
        assert stream.finished and stream.completion_tokens == 0
        with pytest.raises(ContextLengthExceededError):
            await scheduler.submit(dataclasses.replace(scoring, params=SamplingParams(max_tokens=1)))


async def test_short_jobs_are_prefilled_before_long_ones_that_arrived_with_them(tiny_text_path):
    gather = {"max_prefill_tokens": 48, "batch_timeout_s": 0.5}
    async with running_scheduler(tiny_text_path, executor=gather, max_new_tokens=200) as scheduler:
        # Long prompts need several 48-token chunks; the short one fits in one.
        longs = [
            await scheduler.submit(request(i, max_tokens=150, text="a long request " * 20)) for i in range(5)
        ]
        short = await scheduler.submit(request(9, max_tokens=2, text="a short request " * 3))
        async with anyio.create_task_group() as tg:
            for s in [*longs, short]:
                tg.start_soon(consume, s)
        assert short.first_token_at < min(s.first_token_at for s in longs)
        assert short.finished_at < min(s.finished_at for s in longs)


async def test_a_reader_that_never_reads_does_not_stall_the_batch(tiny_text_path):
    async with running_scheduler(tiny_text_path) as scheduler:
        idle = await scheduler.submit(request(0, max_tokens=40))
        busy = await scheduler.submit(request(1, max_tokens=40))
        with anyio.fail_after(30):
            await consume(busy)
            while not idle.finished:  # it generated to the end with nobody reading
                await anyio.sleep(0.01)
        # Everything it produced waits, coalesced, for its reader: one update with all 40 tokens.
        updates = [u async for u in idle]
        assert len(updates) == 1 and len(updates[0].choices[0].token_ids) == 40


async def test_answers_read_whole_wake_the_loop_for_their_first_tokens_and_their_end(tiny_text_path):
    """A non-streamed request's tokens wait in the replica between its first and its last: the
    event loop is not woken every step for text nobody reads before the end."""
    async with running_scheduler(tiny_text_path) as scheduler:
        deliveries: collections.Counter[str] = collections.Counter()
        apply = scheduler._apply

        def counting(items):
            deliveries.update(stream.request_id for stream, _, _ in items)
            apply(items)

        scheduler._apply = counting
        streamed = await scheduler.submit(request(0, max_tokens=20))
        whole = await scheduler.submit(
            dataclasses.replace(request(0, max_tokens=20, n=2), request_id="whole", streamed=False)
        )
        with anyio.fail_after(60):
            streamed_text, whole_text = await consume(streamed), await consume(whole)
    assert deliveries["r0"] >= 20
    assert deliveries["whole"] <= 4  # each choice: its first token, then the rest with its end
    assert whole.completion_tokens == 40 and whole_text == streamed_text * 2  # greedy: both choices alike
    assert whole.first_token_at < whole.finished_at


async def test_n_above_the_batch_is_refused_and_n_up_to_it_waits_for_rows(tiny_text_path):
    async with running_scheduler(tiny_text_path, max_batch_size=2) as scheduler:
        with pytest.raises(InvalidRequestError) as info:
            await scheduler.submit(request(0, n=3))
        assert info.value.param == "n" and "MAX_BATCH_SIZE" in info.value.message
        busy = await scheduler.submit(request(1, max_tokens=30))
        wide = await scheduler.submit(request(2, max_tokens=5, n=2, temperature=1.0, seed=3))
        behind = await scheduler.submit(request(3, max_tokens=5))
        with anyio.fail_after(60):
            texts = [await consume(s) for s in (busy, wide, behind)]
        assert all(texts)
        assert wide.completion_tokens == 10 and behind.completion_tokens == 5


async def test_the_replica_never_waits_for_a_busy_event_loop(tiny_text_path):
    async with running_scheduler(tiny_text_path, max_new_tokens=512) as scheduler:
        executor = scheduler.executors[0]
        stream = await scheduler.submit(request(0, max_tokens=500))
        with anyio.fail_after(30):
            while not stream.completion_tokens:
                await anyio.sleep(0.01)
        before = executor.steps
        time.sleep(1.0)  # the event loop is stuck: nothing it would run gets to run
        during = executor.steps - before
        stream.cancel()
        # The tiny model takes a few milliseconds a step; a hand-off that waited for the loop
        # would have stopped the replica after one step.
        assert during >= 10


async def test_each_preparation_lane_tokenizes_with_a_tokenizer_of_its_own(tiny_text_path):
    """transformers sets `split_special_tokens` on the Rust tokenizer for one call: with one
    tokenizer for both lanes, a light prompt tokenized meanwhile had `<|im_end|>` split into
    text (22 of 1,600 served completions had 8 prompt tokens instead of 1, without a word)."""
    async with running_scheduler(tiny_text_path, max_input_tokens=20_000) as scheduler:
        light, heavy = await scheduler._builder(False), await scheduler._builder(True)
        assert light.tokenizer is not heavy.tokenizer
        special = PromptInput(text="<|im_end|>", add_special_tokens=False)
        [expected] = (await scheduler.tokenize(special)).token_ids
        split = PromptInput(text="abc def " * 5_000 + "<|im_end|>", split_special_tokens=True)
        seen: collections.Counter = collections.Counter()

        async def tokenize_light() -> None:
            for _ in range(400):
                seen[tuple((await scheduler.tokenize(special)).token_ids)] += 1

        async def tokenize_split() -> None:
            for _ in range(6):
                assert len((await scheduler.tokenize(split)).token_ids) > 1000

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(tokenize_light)
                tg.start_soon(tokenize_split)
        assert seen == {(expected,): 400}


async def test_the_choices_reserved_for_a_fork_are_counted_once(tiny_text_path):
    """While an n = 4 request's prompt was computed, its 3 reserved choices counted as running
    and as waiting (4 + 3): with MAX_QUEUE_SIZE 1 and 4 rows, a 1-choice request was a 503."""
    async with running_scheduler(
        tiny_text_path, max_batch_size=4, max_queue_size=1, max_prefill_tokens=16, max_input_tokens=1000
    ) as scheduler:
        executor = scheduler.executors[0]
        wide = await scheduler.submit(request(0, max_tokens=4, text="word " * 300, n=4))
        figures = set()
        with anyio.fail_after(60):
            while not wide.first_token_at:
                figures.add((executor.num_running, executor.queue_depth))
                await anyio.sleep(0.002)
        await consume(wide)
        assert all(running + queued <= 4 for running, queued in figures), figures


def test_many_messages_or_big_template_variables_are_prepared_in_the_heavy_lane():
    """Counted by their text alone, 1.9 million empty messages ran in the light lane for 13 s,
    every light request waiting behind them."""
    from scheduler.core import is_heavy

    def chat(messages, **fields):
        return PromptInput(messages=tuple(messages), **fields)

    assert not is_heavy(chat([{"role": "user", "content": "hi"}] * 20))
    assert is_heavy(chat([{"role": "user", "content": ""}] * 4000))
    assert is_heavy(chat([{"role": "user", "content": [{"type": "text", "text": ""}] * 1024}] * 2))
    assert is_heavy(chat([{"role": "user", "content": "hi"}], chat_template_kwargs={"docs": ["x"] * 40_000}))
    assert is_heavy(
        chat([{"role": "user", "content": "hi"}], tools=tuple({"type": "function"} for _ in range(128)))
    )
