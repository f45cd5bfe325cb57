"""STREAM_INTERVAL: a streamed choice's first token goes out at once, then its tokens in groups of
the interval, then whatever is left with its end; the tokens are the same as one at a time."""

from __future__ import annotations

import dataclasses

import pytest

from models.loader import LoadSpec
from models.params import SamplingParams
from models.prompt import PreparedPrompt
from models.replica import build_replica
from tests.unit.configs import engine_config, replica_config
from tests.unit.engine_driver import EngineDriver

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def replica(tiny_text_path):
    return build_replica(
        LoadSpec(source=str(tiny_text_path), dtype="fp32", attn_impl="sdpa"), replica_config(max_batch_size=8)
    )


def _hand_offs(replica, interval: int, *, n: int = 1, max_tokens: int = 10) -> tuple[dict, dict]:
    """Tokens per hand-off of each choice, and each choice's tokens."""
    driver = EngineDriver(replica)
    # From the setting, as the server builds its executors (STREAM_INTERVAL / --stream-interval).
    from_settings = engine_config(stream_interval=interval).executor
    assert from_settings.stream_interval == interval
    driver.executor.config = dataclasses.replace(
        driver.executor.config, stream_interval=from_settings.stream_interval
    )
    sizes: dict[int, list[int]] = {}
    deliver = driver._deliver

    def counting(items) -> None:
        for _, index, delta in items:
            sizes.setdefault(index, []).append(len(delta.token_ids))
        deliver(items)

    driver.executor._deliver = counting
    prompt = PreparedPrompt(replica.loaded.tokenizer("the same prompt every time")["input_ids"])
    stream = driver.submit(prompt, SamplingParams(max_tokens=max_tokens, **GREEDY), n=n)
    driver.run([stream])
    return sizes, {i: tokens for i, tokens in enumerate(driver.outputs(stream))}


def test_every_token_goes_out_alone_by_default(replica) -> None:
    sizes, _ = _hand_offs(replica, 1)
    assert sizes == {0: [1] * 10}


@pytest.mark.parametrize(("interval", "expected"), [(4, [1, 4, 4, 1]), (3, [1, 3, 3, 3]), (20, [1, 9])])
def test_tokens_go_out_in_groups_after_the_first(replica, interval, expected) -> None:
    sizes, tokens = _hand_offs(replica, interval)
    _, alone = _hand_offs(replica, 1)
    assert sizes == {0: expected}
    assert tokens == alone  # grouping changes when tokens go out, never which


def test_each_choice_of_n_groups_its_own_tokens(replica) -> None:
    sizes, tokens = _hand_offs(replica, 4, n=2)
    assert sizes == {0: [1, 4, 4, 1], 1: [1, 4, 4, 1]}
    assert all(len(choice) == 10 for choice in tokens.values())
