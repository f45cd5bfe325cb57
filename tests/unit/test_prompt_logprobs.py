"""Prompt logprobs (scoring) on the real tiny model through the real executor: they equal the
model's own full forward, whether the prompt is computed in one chunk or several, alone or next to
rows that do not ask, and when its prefix is already cached; max_tokens 0 scores and stops; the
generic path refuses them with a 400."""

from __future__ import annotations

import dataclasses
import math

import anyio
import pytest
import torch

from models.generation import Generation
from models.loader import LoadSpec
from models.params import PromptInput, SamplingParams
from models.prompt import PreparedPrompt
from models.replica import build_replica
from scheduler.core import Scheduler
from scheduler.errors import InvalidRequestError
from scheduler.request import EngineRequest, RequestStream
from tests.unit.configs import engine_config, replica_config
from tests.unit.engine_driver import EngineDriver

GREEDY = dict(temperature=0.0, ignore_eos=True)
TOP = 3
TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest. " * 2


@pytest.fixture(scope="module")
def replica(tiny_text_path):
    return build_replica(
        LoadSpec(source=str(tiny_text_path), dtype="fp32", attn_impl="sdpa"), replica_config(max_batch_size=8)
    )


def prepared(replica, text: str) -> PreparedPrompt:
    return PreparedPrompt(replica.loaded.tokenizer(text)["input_ids"])


def reference(replica, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' own forward over the whole prompt, with the model's own
    attention: row i scores token i + 1."""
    model = replica.loaded.model
    config = model.config.get_text_config(decoder=True)
    original = config._attn_implementation
    config._attn_implementation = replica.runner.original_attn
    try:
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([token_ids])).logits[0].float()
    finally:
        config._attn_implementation = original
    return torch.log_softmax(logits, dim=-1)[:-1]


def check(replica, driver: EngineDriver, stream: RequestStream, token_ids: list[int]) -> None:
    entries = driver.prompt_logprobs[stream.request_id]
    assert [e.token_id for e in entries] == token_ids
    assert entries[0].logprob is None and entries[0].top == []
    expected = reference(replica, token_ids)
    for position, entry in enumerate(entries[1:]):
        row = expected[position]
        assert math.isclose(entry.logprob, row[entry.token_id].item(), abs_tol=1e-4)
        assert entry.rank == int((row > row[entry.token_id]).sum()) + 1
        values, ids = torch.topk(row, TOP)
        assert [t for t, _ in entry.top] == ids.tolist()
        assert all(
            math.isclose(a, b, abs_tol=1e-4) for (_, a), b in zip(entry.top, values.tolist(), strict=True)
        )
        assert entry.token and len(entry.top_tokens) == TOP  # named for the HTTP layer


@pytest.mark.parametrize("budget", [10_000, 7])
def test_prompt_logprobs_equal_the_models_own_forward(replica, budget):
    driver = EngineDriver(replica, max_prefill_tokens=budget)  # 7: the prompt takes many chunks
    prompt = prepared(replica, TEXT)
    stream = driver.submit(prompt, SamplingParams(max_tokens=2, prompt_logprobs=TOP, **GREEDY))
    driver.run([stream])
    check(replica, driver, stream, list(prompt.token_ids))
    assert len(driver.outputs(stream)[0]) == 2


def test_a_cached_prefix_is_computed_again_for_prompt_logprobs(replica):
    driver = EngineDriver(replica, max_prefill_tokens=16)
    prompt = prepared(replica, TEXT)
    warm = driver.submit(prompt, SamplingParams(max_tokens=1, **GREEDY))
    driver.run([warm])
    blocks = driver.executor.batch.blocks
    hits = blocks.hit_tokens
    again = driver.submit(prompt, SamplingParams(max_tokens=1, **GREEDY))
    driver.run([again])
    assert blocks.hit_tokens > hits  # the prompt is cached: a plain request reuses it
    scored = driver.submit(prompt, SamplingParams(max_tokens=1, prompt_logprobs=TOP, **GREEDY))
    driver.run([scored])
    check(replica, driver, scored, list(prompt.token_ids))  # every position, as if uncached
    assert driver.outputs(scored) == driver.outputs(warm)


def test_rows_that_do_not_ask_are_unchanged_and_plan_no_scoring(replica):
    driver = EngineDriver(replica, max_prefill_tokens=10_000)
    prompt = prepared(replica, TEXT)
    plain_alone = driver.submit(prompt, SamplingParams(max_tokens=6, **GREEDY))
    driver.run([plain_alone])
    expected = driver.outputs(plain_alone)
    driver = EngineDriver(replica, max_prefill_tokens=10_000)
    other = prepared(replica, "A different prompt that shares nothing with the first one.")
    plain = driver.submit(other, SamplingParams(max_tokens=6, **GREEDY))
    scored = driver.submit(prompt, SamplingParams(max_tokens=6, prompt_logprobs=0, **GREEDY))
    batch = driver.executor.batch
    driver.executor._collect()
    plan = batch.schedule()
    by_seq = {seq.seq_id: seq for seq in batch.running}
    scorings = {by_seq[row.seq_id].group.stream.request_id: row.scoring for row in plan.rows}
    assert scorings[plain.request_id] is None
    assert len(scorings[scored.request_id].targets) == len(prompt.token_ids) - 1
    batch.forget_step(plan)
    driver.run([plain, scored])
    assert driver.outputs(scored) == expected  # scoring changes no token
    assert driver.prompt_logprobs[plain.request_id] == []
    assert all(entry.top == [] for entry in driver.prompt_logprobs[scored.request_id])


def test_prompt_logprobs_that_cannot_be_named_fail_their_request_alone(replica, monkeypatch):
    real = Generation.add_prompt_logprobs

    def add_prompt_logprobs(self, entries):
        if self.max_tokens == 5:  # the one request whose tokenizer work breaks
            raise RuntimeError("a tokenizer that cannot name these ids")
        return real(self, entries)

    monkeypatch.setattr(Generation, "add_prompt_logprobs", add_prompt_logprobs)
    driver = EngineDriver(replica)
    prompt = prepared(replica, TEXT)
    fine = driver.submit(prompt, SamplingParams(max_tokens=6, prompt_logprobs=TOP, **GREEDY))
    broken = driver.submit(prompt, SamplingParams(max_tokens=5, prompt_logprobs=TOP, **GREEDY))
    driver.run([fine, broken])
    assert driver.finished[(broken.request_id, 0)][0] == "error"
    assert driver.tokens[(broken.request_id, 0)] == []  # nothing after the failed step
    assert driver.finished[(fine.request_id, 0)][0] == "length"
    assert len(driver.outputs(fine)[0]) == 6 and driver.prompt_logprobs[fine.request_id]
    assert not driver.executor.batch.running and driver.executor.batch.blocks.num_used == 0


def test_max_tokens_zero_scores_the_prompt_and_generates_nothing(replica):
    driver = EngineDriver(replica)
    prompt = prepared(replica, TEXT)
    stream = driver.submit(prompt, SamplingParams(max_tokens=0, prompt_logprobs=TOP, **GREEDY))
    driver.run([stream])
    assert driver.outputs(stream) == [[]]
    assert driver.finished[(stream.request_id, 0)][0] == "length"
    check(replica, driver, stream, list(prompt.token_ids))
    assert not driver.executor.batch.running  # it left the batch


def test_n_choices_share_the_prompt_logprobs_computed_once(replica):
    driver = EngineDriver(replica)
    prompt = prepared(replica, TEXT)
    stream = driver.submit(prompt, SamplingParams(max_tokens=3, prompt_logprobs=TOP, **GREEDY), n=3)
    driver.run([stream])
    check(replica, driver, stream, list(prompt.token_ids))  # each prompt token exactly once
    assert all(len(tokens) == 3 for tokens in driver.outputs(stream))


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_the_generic_path_refuses_prompt_logprobs_with_a_400(tiny_text_path):
    config = engine_config(tiny_text_path, max_queue_size=8, max_batch_size=4)
    config = dataclasses.replace(config, replica=dataclasses.replace(config.replica, force_generic=True))
    scheduler = Scheduler(config)
    await scheduler.start()
    try:
        with anyio.fail_after(120):
            while scheduler.status == "loading":
                await anyio.sleep(0.05)
        assert scheduler.replica_stats()[0]["path"] == "generic"
        scored = SamplingParams(max_tokens=1, prompt_logprobs=0, **GREEDY)
        with pytest.raises(InvalidRequestError) as info:
            await scheduler.submit(EngineRequest("g", PromptInput(text="hello"), scored))
        assert info.value.param == "prompt_logprobs"
        plain = await scheduler.submit(
            EngineRequest("p", PromptInput(text="hello"), SamplingParams(max_tokens=1))
        )
        async for _ in plain:
            pass
        assert plain.completion_tokens == 1  # the replica serves everything else
    finally:
        await scheduler.drain(5)


def test_a_prompt_preempted_mid_prefill_scores_each_token_once(replica):
    from scheduler.blocks import BlockManager

    size = replica.block_size
    driver = EngineDriver(replica, max_prefill_tokens=4)
    batch = driver.executor.batch
    # A pool of 11 blocks: the long scored prompt fits beside the decoding request only until that
    # one grows, and then it is preempted (it arrived last) while its prompt is half computed.
    batch.blocks = BlockManager(11, size, enable_prefix_caching=True)
    batch.config = dataclasses.replace(batch.config, watermark_blocks=1)
    first = PreparedPrompt(prepared(replica, TEXT).token_ids[: size + 4])
    long = PreparedPrompt((prepared(replica, TEXT * 3).token_ids * 2)[: 8 * size])
    decoding = driver.submit(first, SamplingParams(max_tokens=6 * size, **GREEDY))
    while not driver.tokens[(decoding.request_id, 0)]:
        driver.executor.step()
    scored = driver.submit(long, SamplingParams(max_tokens=1, prompt_logprobs=TOP, **GREEDY))
    preempted_at: list[int] = []  # how far the victim's prompt was scored
    preempt = batch._preempt
    batch._preempt = lambda victim: (preempted_at.append(victim.scored_until), preempt(victim))
    driver.run([decoding, scored])
    assert any(1 < done < len(long.token_ids) for done in preempted_at), preempted_at
    check(replica, driver, scored, list(long.token_ids))  # every prompt token exactly once, right


def test_a_step_retried_row_by_row_scores_each_token_once(replica, monkeypatch):
    import models.runner

    draw = models.runner.draw
    calls = []

    def fails_once(logits, rows):  # the whole step fails after scoring; each row then runs alone
        calls.append(len(rows))
        if len(calls) == 1:
            raise RuntimeError("the step broke")
        return draw(logits, rows)

    monkeypatch.setattr(models.runner, "draw", fails_once)
    driver = EngineDriver(replica)
    prompt = prepared(replica, TEXT)
    other = driver.submit(
        prepared(replica, "Another prompt in the same step."), SamplingParams(max_tokens=1, **GREEDY)
    )
    scored = driver.submit(prompt, SamplingParams(max_tokens=1, prompt_logprobs=TOP, **GREEDY))
    driver.run([other, scored])
    assert calls[:3] == [2, 1, 1]
    check(replica, driver, scored, list(prompt.token_ids))
