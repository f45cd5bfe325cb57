"""Falcon on the fast path (`models.falcon`): each layout of its fused query/key/value projection,
rotary or ALiBi, gives transformers' generate() tokens with four requests in flight, and the
startup self-test sends a Falcon forward that gets any of them wrong to the generic path."""

from __future__ import annotations

import pytest
import torch

import models.falcon as falcon
from models.kv_cache import kv_bytes_per_token
from models.loader import LoadSpec
from models.params import SamplingParams
from models.replica import build_replica
from models.tiny import build_tokenizer, chat_template
from tests.unit.configs import replica_config
from tests.unit.engine_driver import EngineDriver, hf_greedy
from tests.unit.test_text_architectures import ARCHS, MAX_NEW, _prompt, build

LAYOUTS = sorted(name for name in ARCHS if name.startswith("falcon"))

pytestmark = pytest.mark.slow  # builds and loads a checkpoint per case


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tokenizer(512)
    tok.chat_template = chat_template(None)
    return tok


def _replica(name: str, tokenizer, out):
    build(name, ARCHS[name][0], tokenizer, out)
    return build_replica(
        LoadSpec(source=str(out), dtype="fp32", attn_impl="sdpa"), replica_config(max_batch_size=4)
    )


@pytest.mark.parametrize("name", LAYOUTS)
def test_four_falcon_requests_at_once_match_generate(name, tokenizer, tmp_path):
    """Submitted together with a 16-token prefill budget: the short prompts decode while the
    long one is still prefilled, chunk after chunk, in the same steps."""
    replica = _replica(name, tokenizer, tmp_path)
    assert replica.path == "fast", replica.path_reason
    # The pool was sized from the config's estimate: it must be what the layers write (Falcon-40B
    # style configs say multi_query yet keep a key and value head per group).
    config = replica.loaded.model.config
    per_token = kv_bytes_per_token(config, torch.float32)
    assert replica.kv_pool_bytes == per_token * (replica.num_blocks + 2) * replica.block_size
    prompts = [_prompt(tokenizer, length) for length in (7, 23, 41, 130)]
    expected = [hf_greedy(replica, prompt, MAX_NEW) for prompt in prompts]
    driver = EngineDriver(replica, max_batch_size=4, max_prefill_tokens=16)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    streams = [driver.submit(prompt, params) for prompt in prompts]
    driver.run(streams)
    assert [driver.outputs(stream)[0] for stream in streams] == expected


def _without_alibi(monkeypatch):
    monkeypatch.setattr(
        falcon.AlibiBias,
        "__call__",
        lambda self, length, device, dtype: torch.zeros(self.num_heads, length, device=device, dtype=dtype),
    )


def _without_rotary(monkeypatch):
    monkeypatch.setattr(falcon, "apply_rotary_pos_emb", lambda query, key, cos, sin: (query, key))


def _keys_of_another_group(monkeypatch):
    split = falcon.split_heads

    def swapped(module, fused):
        query, key, value = split(module, fused)
        return query, key.flip(1), value

    monkeypatch.setattr(falcon, "split_heads", swapped)


@pytest.mark.parametrize(
    ("name", "breakage"),
    [
        ("falcon-alibi", _without_alibi),
        ("falcon", _without_rotary),
        ("falcon-new-decoder", _keys_of_another_group),
    ],
)
def test_the_self_test_sends_a_wrong_falcon_forward_to_the_generic_path(
    name, breakage, tokenizer, tmp_path, monkeypatch
):
    breakage(monkeypatch)
    replica = _replica(name, tokenizer, tmp_path)
    assert replica.path == "generic" and "differ" in replica.path_reason, replica.path_reason
    # The generic path runs transformers' own attention forward again.
    attention = [m for m in replica.loaded.model.modules() if isinstance(m, falcon.FalconAttention)]
    assert attention and not any("forward" in vars(m) for m in attention)
