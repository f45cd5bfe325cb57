"""The per-slot KV cache grows rows and positions on demand and respects its memory budget."""

from __future__ import annotations

import torch

from models.kv_cache import SlotKVCache


def make(**kwargs) -> SlotKVCache:
    kwargs.setdefault("bytes_per_token", 2 * 2 * 4 * 4)  # 2 layers, k+v, 2 heads x 4 dims... as fp32
    return SlotKVCache(16, 1024, torch.device("cpu"), min_capacity=8, min_rows=2, **kwargs)


def test_rows_and_positions_grow_by_doubling_and_keep_contents():
    cache = make()
    keys, values = cache.layer(0, torch.zeros(1, 2, 1, 4))
    keys[1, :, 3] = 7.0
    cache.reserve(3, 20)
    assert (cache.rows, cache.capacity) == (4, 20)
    keys, _ = cache.layer(0, torch.zeros(1, 2, 1, 4))
    assert keys.shape == (4, 2, 20, 4) and float(keys[1, 0, 3, 0]) == 7.0
    cache.reserve(2, 21)
    assert cache.capacity == 40  # doubling, so a growing sequence copies O(log n) times


def test_one_long_row_costs_one_row_not_every_slot():
    cache = make(budget_bytes=64 * 1000 * 2)
    assert cache.fits(1, 1000)
    assert not cache.fits(16, 1000)


def test_move_copies_a_prefix_between_slots():
    cache = make()
    keys, _ = cache.layer(0, torch.zeros(1, 2, 1, 4))
    keys[0, :, :5] = 1.0
    cache.move(0, 1, 5)
    assert bool((keys[1, :, :5] == 1.0).all()) and bool((keys[1, :, 5:] == 0).all())
    cache.release_memory()
    assert cache.nbytes == 0 and (cache.rows, cache.capacity) == (2, 8)
