"""The paged KV pool: allocated on first use with the layer's own head shape, zeroed and copied
by whole blocks, with a zero block for padding and a scratch block for the padding rows of graph steps."""

from __future__ import annotations

import pytest
import torch

from models.kv_cache import PagedKVCache, kv_bytes_per_token
from models.loader import LoadSpec, ModelLoadError
from models.replica import MIN_POOL_TOKENS, build_replica
from tests.unit.configs import replica_config


def test_pools_take_the_layer_shape_and_keep_a_zero_padding_block():
    cache = PagedKVCache(6, 4, torch.device("cpu"))
    assert not cache.is_allocated
    keys, values = cache.layer(0, torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))
    assert keys.shape == (8, 4, 2, 8) and values.shape == keys.shape
    assert cache.null_block == 6 and bool((keys[6] == 0).all())
    assert cache.scratch_block == 7  # the padding rows of graph decode steps write here
    half = torch.zeros(1, 1, 3, 16, dtype=torch.float16)
    other, narrow = cache.layer(1, half, half[..., :12])  # per-layer shapes; values of their own size
    assert other.shape == (8, 4, 1, 16) and other.dtype == torch.float16 and narrow.shape == (8, 4, 1, 12)
    assert cache.nbytes == 2 * (8 * 4 * 2 * 8 * 4) + (8 * 4 * 1 * (16 + 12) * 2)


def test_blocks_are_zeroed_and_copied_whole():
    cache = PagedKVCache(4, 2, torch.device("cpu"))
    keys, values = cache.layer(0, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    keys[1] = float("nan")
    values[1] = 3.0
    cache.copy_blocks(torch.tensor([1]), torch.tensor([2]))
    assert bool(torch.isnan(keys[2]).all()) and bool((values[2] == 3.0).all())
    cache.zero_blocks(torch.tensor([1, 2]))
    assert bool((keys[1:3] == 0).all()) and bool((values[1:3] == 0).all())


def test_bytes_per_token_from_the_config():
    class Config:
        num_hidden_layers, num_attention_heads, num_key_value_heads, hidden_size = 2, 4, 2, 64

    assert kv_bytes_per_token(Config(), torch.float32) == 2 * 2 * 2 * 16 * 4


def test_bytes_per_token_of_mla_count_expanded_keys_and_values():
    class Config:
        num_hidden_layers, num_attention_heads, num_key_value_heads, hidden_size = 2, 4, 4, 64
        qk_nope_head_dim, qk_rope_head_dim, v_head_dim = 16, 8, 12

    assert kv_bytes_per_token(Config(), torch.float32) == 2 * 4 * (24 + 12) * 4


def test_bytes_per_token_of_falcon_count_one_kv_head_or_its_groups():
    from transformers import FalconConfig

    sizes = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    seven_b = FalconConfig(**sizes, multi_query=True, new_decoder_architecture=False)
    assert kv_bytes_per_token(seven_b, torch.float32) == 2 * 1 * 2 * 16 * 4
    # Falcon-40B's config says multi_query too, but keeps a key and value head per group.
    forty_b = FalconConfig(**sizes, multi_query=True, new_decoder_architecture=True, num_kv_heads=2)
    assert kv_bytes_per_token(forty_b, torch.float32) == 2 * 2 * 2 * 16 * 4


def test_the_automatic_pool_is_never_below_the_minimum():
    """MAX_BATCH_SIZE=1 (the spec's low-latency setting) with a short context used to ask free
    memory for fewer tokens than the pool's minimum and leave the server degraded for good."""
    spec = LoadSpec(source="builtin:tiny", dtype="fp32")
    small = replica_config(
        max_batch_size=1, max_input_tokens=100, max_new_tokens=16, kv_cache_budget_bytes=None
    )
    replica = build_replica(spec, small)
    assert replica.runner.num_blocks * replica.runner.block_size >= MIN_POOL_TOKENS
    # An explicit budget that small is still refused, and the message names the setting.
    per_token = kv_bytes_per_token(replica.loaded.model.config.get_text_config(decoder=True), torch.float32)
    with pytest.raises(ModelLoadError, match="KV_CACHE_MAX_GIB"):
        build_replica(spec, replica_config(kv_cache_budget_bytes=64 * per_token))
