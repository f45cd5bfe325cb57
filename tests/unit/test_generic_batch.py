"""Merged decoding on the generic path: several generate() calls' decode forwards as one, each
sequence getting exactly its own logits and cache back."""

from __future__ import annotations

import copy

import pytest
import torch

from models.generic_batch import batching_problem, groups, mergeable, run_merged


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _decode_call(model, ids: list[int], token: int) -> dict:
    prefill = model(input_ids=torch.tensor([ids]), use_cache=True)
    return {
        "input_ids": torch.tensor([[token]]),
        "attention_mask": torch.ones(1, len(ids) + 1, dtype=torch.long),
        "position_ids": torch.tensor([[len(ids)]]),
        "past_key_values": prefill.past_key_values,
        "use_cache": True,
        "return_dict": True,
    }


@torch.inference_mode()
def test_merged_decoding_gives_each_sequence_its_own_logits_and_cache(model):
    prompts = [list(range(3, 20)), list(range(7, 12)), list(range(30, 40))]
    calls = [_decode_call(model, ids, token) for ids, token in zip(prompts, (5, 9, 11), strict=True)]
    alone = [model(**dict(c, past_key_values=copy.deepcopy(c["past_key_values"]))) for c in calls]
    assert groups(calls, with_positions=True) == [[0, 1, 2]]
    merged = run_merged(model.forward, calls, with_positions=True)
    for single, out, ids in zip(alone, merged, prompts, strict=True):
        torch.testing.assert_close(out.logits, single.logits, rtol=1e-5, atol=1e-5)
        assert out.past_key_values.get_seq_length() == len(ids) + 1
        for mine, theirs in zip(out.past_key_values.layers, single.past_key_values.layers, strict=True):
            torch.testing.assert_close(mine.keys, theirs.keys)
    # The caches continue alone: a second step on one of them matches a second single step.
    follow = dict(calls[1], input_ids=torch.tensor([[4]]), position_ids=torch.tensor([[len(prompts[1]) + 1]]),
                  attention_mask=torch.ones(1, len(prompts[1]) + 2, dtype=torch.long))  # fmt: skip
    single_follow = dict(follow, past_key_values=alone[1].past_key_values)
    torch.testing.assert_close(model(**follow).logits, model(**single_follow).logits, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_calls_it_does_not_understand_are_computed_alone(model):
    call = _decode_call(model, list(range(3, 12)), 5)
    assert mergeable(call)
    assert not mergeable(dict(call, cross_attention_mask=torch.ones(1, 1, 1, 1)))
    assert not mergeable(dict(call, input_ids=torch.tensor([[5, 6]])))
    padded = dict(call, attention_mask=torch.tensor([[0] + [1] * 9]))
    assert not mergeable(padded)
    other = _decode_call(model, list(range(3, 8)), 5)
    # Without per-row positions, only equal lengths may share a forward.
    assert groups([call, other], with_positions=False) == [[0], [1]]


@torch.inference_mode()
def test_the_startup_check_accepts_a_model_whose_merged_decoding_matches(model):
    assert batching_problem(model, model.forward, list(range(3, 30))) is None

    def broken_forward(input_ids, position_ids=None, **kwargs):  # batched rows leak into each other
        out = model.forward(input_ids=input_ids, position_ids=position_ids, **kwargs)
        if input_ids.shape[0] > 1:
            out.logits = out.logits + out.logits.flip(0)
        return out

    assert "differs" in batching_problem(model, broken_forward, list(range(3, 30)))

    def positionless(input_ids, **kwargs):
        return model.forward(input_ids=input_ids, **kwargs)

    assert "position ids" in batching_problem(model, positionless, list(range(3, 30)))


def test_a_generate_that_drops_the_logits_processor_is_caught_at_startup_and_its_thread_ends(model):
    """Janus's generate() takes logits_processor and never passes it on: the runner got a second
    forward where scores were due, its stop() waited a minute for a thread blocked on a forward it
    would never compute (the step loop frozen, the thread leaked), and every request failed that
    way while /health said ready. Now the startup check names it and the thread is woken."""
    import contextlib
    import threading
    import time

    from models.generic import GenericRunner

    class DropsProcessors(type(model)):
        def generate(self, *args, logits_processor=None, **kwargs):
            return super().generate(*args, **kwargs)

    dropping = copy.deepcopy(model)
    dropping.__class__ = DropsProcessors
    runner = GenericRunner(dropping, device=torch.device("cpu"), pad_token_id=0, scope=contextlib.nullcontext)
    threads_before = threading.active_count()
    started = time.monotonic()
    with torch.inference_mode():
        reason = runner.check_lockstep([1, 2, 3, 4])
    assert reason is not None and "unexpected event" in reason
    assert time.monotonic() - started < 10  # not the 60 s join
    assert threading.active_count() == threads_before  # the sequence's thread ended
    runner.restore_forward()
    plain = GenericRunner(
        copy.deepcopy(model), device=torch.device("cpu"), pad_token_id=0, scope=contextlib.nullcontext
    )
    with torch.inference_mode():
        assert plain.check_lockstep([1, 2, 3, 4]) is None
