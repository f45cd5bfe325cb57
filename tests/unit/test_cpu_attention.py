"""The compiled paged decode attention (`models.cpu_attention`) against the gather + SDPA path it
replaces on CPU: same layouts, same rules, outputs equal within float32 rounding."""

from __future__ import annotations

import math
import re

import pytest
import torch

from models import cpu_attention, native
from models.attention import FULL, DecodeGroup, LayerRule, PagedLayout, _Extras, decode_attention
from models.kv_cache import PagedKVCache

pytestmark = pytest.mark.skipif(cpu_attention.kernel() is None, reason="no C compiler here")


def _layout(lengths, block_size, num_blocks, groups_of=None, seed=0):
    """Decode rows with `lengths` keys each (their positions are length - 1), blocks shuffled
    through the pool; rows split into decode groups by `groups_of` (lists of row indices)."""
    generator = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(num_blocks, block_size, torch.device("cpu"))
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables = []
    for length in lengths:
        width = -(-length // block_size)
        tables.append([order.pop() for _ in range(width)])
    groups = []
    for members in groups_of or [list(range(len(lengths)))]:
        width = max(len(tables[i]) for i in members)
        padded = [tables[i] + [cache.null_block] * (width - len(tables[i])) for i in members]
        groups.append(
            DecodeGroup(
                rows=None if groups_of is None else torch.tensor(members),
                blocks=torch.tensor(padded),
                positions=torch.tensor([lengths[i] - 1 for i in members]),
            )
        )
    positions = torch.tensor([length - 1 for length in lengths])
    layout = PagedLayout(
        cache,
        torch.zeros(len(lengths), dtype=torch.long),
        positions,
        num_decode=len(lengths),
        in_place_decode=True,
    )
    layout.decode_groups = groups
    return layout


def _pools(cache, kv_heads, dim, dim_v, seed=1):
    generator = torch.Generator().manual_seed(seed)
    shape = (cache.num_blocks + 2, cache.block_size, kv_heads)
    keys = torch.randn(*shape, dim, generator=generator)
    values = torch.randn(*shape, dim_v, generator=generator)
    keys[cache.null_block] = 0
    values[cache.null_block] = 0
    return keys, values


def _query(rows, heads, dim, seed=2):
    # As the model hands it over: [1, T, H, D] projected, viewed as [1, H, T, D] (not contiguous).
    return torch.randn(1, rows, heads, dim, generator=torch.Generator().manual_seed(seed)).transpose(1, 2)


def _both(layout, keys, values, query, scaling, rule):
    extras = _Extras(None, None)
    calls = []
    original = cpu_attention.attend
    cpu_attention.attend = lambda *args: calls.append(1) or original(*args)
    try:
        fast = decode_attention(layout, keys, values, query, scaling, rule, extras)
        assert len(calls) == len(layout.decode_groups)  # the kernel, not the path it replaces
        layout.in_place_decode = False  # as a runner whose self-test turned the kernel off
        for group in layout.decode_groups:
            group.masks.clear()
        reference = decode_attention(layout, keys, values, query, scaling, rule, extras)
        assert len(calls) == len(layout.decode_groups)  # gather + SDPA alone
    finally:
        cpu_attention.attend = original
    return fast, reference


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "dim_v", "block_size", "lengths"),
    [
        (12, 4, 64, 64, 16, [1, 17, 80, 300]),  # the bench model's shape; a row longer than a tile
        (8, 8, 32, 32, 16, [5, 64, 65]),  # no GQA
        (6, 1, 80, 80, 8, [3, 129, 40]),  # MQA, a head size that is no multiple of 16
        (4, 2, 48, 32, 4, [9, 200]),  # value heads narrower than key heads (MLA-like)
        (2, 2, 16, 16, 1, [1, 2, 70]),  # blocks of one position
        (64, 4, 512, 512, 16, [3, 90]),  # one kv head's queries fill a task's stack share alone
        (12, 4, 64, 64, 16, [1300]),  # one row read in spans (of 512 keys), merged
        (8, 2, 32, 16, 16, [513, 7, 1024, 1025, 2100]),  # spans' edges, next to one-span rows
    ],
)
def test_kernel_matches_gather_and_sdpa(heads, kv_heads, dim, dim_v, block_size, lengths):
    layout = _layout(lengths, block_size, num_blocks=sum(-(-n // block_size) for n in lengths) + 4)
    keys, values = _pools(layout.cache, kv_heads, dim, dim_v)
    query = _query(len(lengths), heads, dim)
    fast, reference = _both(layout, keys, values, query, None, FULL)
    assert fast.shape == reference.shape == (1, heads, len(lengths), dim_v)
    torch.testing.assert_close(fast, reference, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("rule", [LayerRule(window=7), LayerRule(chunk=32), LayerRule(window=50, chunk=64)])
def test_windows_and_chunks(rule):
    lengths = [1, 6, 7, 8, 33, 64, 65, 150]
    layout = _layout(lengths, 16, num_blocks=40)
    keys, values = _pools(layout.cache, 2, 32, 32)
    query = _query(len(lengths), 4, 32)
    fast, reference = _both(layout, keys, values, query, 0.3, rule)
    torch.testing.assert_close(fast, reference, atol=2e-5, rtol=1e-4)


def test_windows_and_chunks_over_rows_read_in_spans():
    lengths = [600, 1500, 40]
    layout = _layout(lengths, 16, num_blocks=140)
    keys, values = _pools(layout.cache, 2, 32, 32)
    query = _query(len(lengths), 4, 32)
    for rule in (LayerRule(window=700), LayerRule(chunk=1024), FULL):
        for group in layout.decode_groups:
            group.masks.clear()
        layout.in_place_decode = True
        fast, reference = _both(layout, keys, values, query, 0.2, rule)
        torch.testing.assert_close(fast, reference, atol=2e-5, rtol=1e-4)


def test_a_row_s_result_does_not_depend_on_the_rows_beside_it():
    """Batch invariance: a long row (read in spans) and a short one give the same bits alone as
    with other rows, in other groups, whatever the thread count."""
    lengths = [1400, 30, 700, 5]
    layout = _layout(lengths, 16, num_blocks=160, groups_of=[[1, 3], [0, 2]])
    keys, values = _pools(layout.cache, 4, 64, 64)
    query = _query(len(lengths), 12, 64)
    together = cpu_attention.decode_attention(layout, keys, values, query, None, FULL)
    threads = torch.get_num_threads()
    for index in (0, 1):
        alone = _layout([lengths[index]], 16, num_blocks=160)
        alone.decode_groups[0].blocks = layout.decode_groups[1 - index].blocks[[0]]
        try:
            torch.set_num_threads(threads if index else 1)
            row = cpu_attention.decode_attention(alone, keys, values, query[:, :, [index]], None, FULL)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(row[0, :, 0], together[0, :, index])


def test_rows_in_several_groups_land_in_their_places():
    lengths = [200, 3, 150, 9, 4]
    layout = _layout(lengths, 16, num_blocks=40, groups_of=[[1, 3, 4], [0, 2]])
    keys, values = _pools(layout.cache, 4, 64, 64)
    query = _query(len(lengths), 8, 64)
    fast, reference = _both(layout, keys, values, query, 1 / math.sqrt(64), FULL)
    torch.testing.assert_close(fast, reference, atol=2e-5, rtol=1e-4)


def test_large_scores_stay_finite_and_pick_the_dominant_key():
    # Scores in the thousands: the online softmax must rescale, not overflow.
    layout = _layout([100], 16, num_blocks=10)
    keys, values = _pools(layout.cache, 1, 16, 16)
    query = _query(1, 1, 16)
    table = layout.decode_groups[0].blocks[0]
    slot = table[57 // 16] * 16 + 57 % 16
    keys.view(-1, 1, 16)[slot] = query[0, 0, 0] * 1000
    fast, reference = _both(layout, keys, values, query, None, FULL)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, reference, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fast[0, 0, 0], values.view(-1, 1, 16)[slot, 0], atol=1e-4, rtol=0)


def test_unsupported_inputs_keep_the_sdpa_path():
    keys = torch.zeros(4, 16, 2, 32)
    query = torch.zeros(1, 4, 1, 32)
    assert cpu_attention.usable(query, keys, keys)
    assert not cpu_attention.usable(query.to(torch.bfloat16), keys.bfloat16(), keys.bfloat16())
    assert not cpu_attention.usable(torch.zeros(1, 3, 1, 32), keys, keys)  # heads not a multiple
    assert not cpu_attention.usable(query, keys.transpose(0, 1), keys)
    wide = torch.zeros(4, 16, 1, 1024)  # 32 query heads of 1024 on one kv head: over the stack share
    assert not cpu_attention.usable(torch.zeros(1, 32, 1, 1024), wide, wide)


def test_the_library_shares_torchs_openmp_runtime():
    """One `libgomp.so.1` in the process, torch's: the kernels' dependency resolves to it. Wheels
    that vendor their own copy under a hashed name (sentencepiece's `libgomp-<hash>.so.1`, with
    its own SONAME) keep it to themselves; nothing of ours or torch's can bind to it."""
    cpu_attention.kernel()
    with open("/proc/self/maps") as maps:
        runtimes = set(re.findall(r"\S*/libgomp\.so[.\d]*", maps.read()))
    assert len(runtimes) == 1, runtimes
    assert "/torch/" in runtimes.pop()


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """`kernel()` looked up anew, with its cache in tmp_path; the usual one again afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu_attention.kernel.cache_clear()
    native.library.cache_clear()
    yield tmp_path
    cpu_attention.kernel.cache_clear()
    native.library.cache_clear()


def test_without_a_compiler_attention_keeps_the_sdpa_path(fresh_kernel, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_kernel / "no-such-compiler"))
    assert cpu_attention.kernel() is None
    keys = torch.zeros(4, 16, 2, 32)
    assert not cpu_attention.usable(torch.zeros(1, 4, 1, 32), keys, keys)


def test_a_failing_build_is_logged_and_falls_back(fresh_kernel, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")
    with caplog.at_level("WARNING", logger="models.native"):
        assert cpu_attention.kernel() is None
    assert "build failed" in caplog.text


def test_built_once_per_machine_then_loaded_from_the_cache(fresh_kernel, caplog):
    with caplog.at_level("INFO", logger="models.native"):
        assert cpu_attention.kernel() is not None
        cpu_attention.kernel.cache_clear()
        native.library.cache_clear()
        assert cpu_attention.kernel() is not None
    built = list((fresh_kernel / "usinc" / "kernels").glob("paged_decode_attention-*.so"))
    assert len(built) == 1
    assert "built into" in caplog.text and "loaded from" in caplog.text


def test_no_usable_cache_directory_is_logged_and_falls_back(fresh_kernel, monkeypatch, caplog):
    # As under a read-only root with /tmp mounted noexec: nowhere to build or load the library.
    blocked = fresh_kernel / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(blocked))
    with caplog.at_level("WARNING", logger="models.native"):
        assert cpu_attention.kernel() is None
    assert "off, gather + SDPA" in caplog.text and str(blocked) in caplog.text


def test_a_model_the_kernel_does_not_reproduce_keeps_the_fast_path_without_it(monkeypatch, caplog):
    from models.loader import LoadSpec
    from models.replica import build_replica
    from tests.unit.configs import replica_config

    original = cpu_attention.attend

    def wrong(query, key_pool, value_pool, blocks, first, length, rows, out, scale):
        original(query, key_pool, value_pool, blocks, first, length, rows, out, scale)
        out.mul_(1.5)

    monkeypatch.setattr(cpu_attention, "attend", wrong)
    with caplog.at_level("WARNING", logger="models.replica"):
        replica = build_replica(LoadSpec(source="builtin:tiny", dtype="fp32"), replica_config())
    assert replica.path == "fast" and not replica.runner.in_place_decode
    assert "self-test failed with the compiled decode attention" in caplog.text
