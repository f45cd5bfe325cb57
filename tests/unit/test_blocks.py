"""The KV block manager on its own: allocation, reference counts, prefix keys, eviction."""

from __future__ import annotations

import pytest

from scheduler.blocks import BlockManager
from scheduler.sequence import PromptSpan, Sequence


def seq(tokens, *, image=None, max_tokens=4, arrival=0.0) -> Sequence:
    return Sequence(list(tokens), max_tokens=max_tokens, arrival=arrival, span=image)


def computed(blocks: BlockManager, s: Sequence) -> Sequence:
    """Pretend the runner computed every token of `s`."""
    s.num_cached = s.num_tokens
    blocks.register(s)
    return s


def test_allocation_and_free_balance():
    blocks = BlockManager(10, 4)
    a, b = seq(range(9)), seq(range(100, 104))
    blocks.allocate(a, [])
    blocks.allocate(b, [])
    assert len(a.block_table) == 3 and len(b.block_table) == 1
    assert blocks.num_free == 6 and blocks.usage == pytest.approx(0.4)
    blocks.check([a.block_table, b.block_table])
    blocks.free(a)
    blocks.check([b.block_table])
    assert blocks.num_free == 9 and a.block_table == [] and a.num_cached == 0


def test_fresh_blocks_are_reported_once():
    blocks = BlockManager(4, 2)
    a = seq(range(3))
    blocks.allocate(a, [])
    assert sorted(blocks.take_fresh()) == sorted(a.block_table)
    assert blocks.take_fresh() == []


def test_a_later_request_with_the_same_prefix_hits_the_cache():
    blocks = BlockManager(16, 4)
    first = seq(range(10))  # blocks [0..3], [4..7] full; [8, 9] partial
    blocks.allocate(first, [])
    computed(blocks, first)
    second = seq([*range(8), 50, 51, 52])
    hits, in_flight = blocks.lookup(second)
    assert not in_flight
    assert hits == first.block_table[:2]
    blocks.allocate(second, hits)
    assert second.num_cached == 8 and second.block_table[:2] == first.block_table[:2]
    assert (blocks.query_tokens, blocks.hit_tokens) == (second.num_tokens + first.num_tokens, 8)
    blocks.check([first.block_table, second.block_table])


def test_hits_stop_before_the_last_token_and_at_the_first_difference():
    blocks = BlockManager(16, 4)
    first = seq(range(8))
    blocks.allocate(first, [])
    computed(blocks, first)
    same = seq(range(8))
    hits, _ = blocks.lookup(same)
    assert len(hits) == 1  # the last token must be computed for its logits: its block is not a hit
    differs = seq([0, 1, 2, 99, 4, 5, 6, 7, 8])
    assert blocks.lookup(differs)[0] == []


def test_images_are_part_of_the_key_from_their_first_token_on():
    blocks = BlockManager(32, 4)
    prompt = list(range(16))
    image_a, image_b = PromptSpan(6, 9, b"a"), PromptSpan(6, 9, b"b")
    first = seq(prompt, image=image_a)
    blocks.allocate(first, [])
    computed(blocks, first)
    other_image = seq(prompt + [1], image=image_b)
    assert len(blocks.lookup(other_image)[0]) == 1  # only the block before the image (tokens 0..3)
    same_image = seq(prompt + [1], image=image_a)
    assert len(blocks.lookup(same_image)[0]) == 4  # past the image: no image inputs needed
    text_only = seq(prompt + [1])
    assert len(blocks.lookup(text_only)[0]) == 1


def test_a_hit_never_ends_inside_an_image():
    blocks = BlockManager(32, 4)
    image = PromptSpan(2, 13, b"x")
    first = seq(range(16), image=image)
    blocks.allocate(first, [])
    computed(blocks, first)
    # A prompt that shares the tokens up to 12: hits would end at 12, inside the image (2..13).
    shorter = seq([*range(12), 77, 78], image=PromptSpan(2, 13, b"x"))
    assert blocks.lookup(shorter)[0] == []


def test_a_prompt_of_whole_blocks_is_not_cut_inside_its_image():
    """16 tokens, an image up to token 13: every block is cached, the last one is recomputed for
    its logits, and the hit that is left (12 tokens) would end inside the image."""
    blocks = BlockManager(32, 4)
    first = seq(range(16), image=PromptSpan(6, 13, b"x"))
    blocks.allocate(first, [])
    computed(blocks, first)
    again = seq(range(16), image=PromptSpan(6, 13, b"x"))
    assert len(blocks.lookup(again)[0]) == 1  # tokens 0..3, before the image
    blocks.allocate(again, blocks.lookup(again)[0])
    assert again.num_cached == 4
    text_only = seq(range(16))
    text_first = seq(range(16))
    blocks.allocate(text_first, [])
    computed(blocks, text_first)
    assert len(blocks.lookup(text_only)[0]) == 3  # no span: every block but the last


def test_cached_blocks_are_evicted_least_recently_used_and_only_when_needed():
    blocks = BlockManager(4, 2)
    old = seq(range(4))
    blocks.allocate(old, [])
    computed(blocks, old)
    blocks.free(old)  # both blocks cached, unreferenced
    newer = seq(range(10, 14))
    blocks.allocate(newer, [])  # takes the two never-cached blocks
    computed(blocks, newer)
    assert len(blocks.lookup(seq(range(5)))[0]) == 2  # the old prefix is still there
    blocks.free(newer)
    third = seq(range(20, 22))
    blocks.allocate(third, [])  # evicts one block: the old one, tail first
    assert len(blocks.lookup(seq(range(5)))[0]) == 1
    assert len(blocks.lookup(seq(range(10, 15)))[0]) == 2
    blocks.check([third.block_table])


def test_reviving_a_cached_block_costs_a_free_block():
    blocks = BlockManager(4, 2)
    old = seq(range(4))
    blocks.allocate(old, [])
    computed(blocks, old)
    blocks.free(old)
    again = seq(range(5))
    hits, _ = blocks.lookup(again)
    assert len(hits) == 2
    assert blocks.cost(again, hits) == 1 + 2  # one new block plus two revived from the free pool
    blocks.allocate(again, hits)
    blocks.check([again.block_table])
    assert blocks.num_free == 1


def test_choices_share_full_prompt_blocks_and_own_their_last_one():
    blocks = BlockManager(10, 4)
    parent, child = seq(range(6)), seq(range(6))
    blocks.allocate(parent, [])
    own = blocks.share_prompt(parent, child)
    assert child.block_table == [parent.block_table[0], own] and own != parent.block_table[1]
    blocks.check([parent.block_table, child.block_table])
    blocks.free(parent)
    blocks.check([child.block_table])
    even = seq(range(8))
    blocks.allocate(even, [])
    twin = seq(range(8))
    assert blocks.share_prompt(even, twin) is None and twin.block_table == even.block_table


def test_a_block_being_computed_is_reported_in_flight():
    blocks = BlockManager(16, 4)
    writer = seq(range(12))
    blocks.allocate(writer, [])
    hits, in_flight = blocks.lookup(seq(range(10)))
    assert hits == [] and in_flight == 2
    computed(blocks, writer)
    hits, in_flight = blocks.lookup(seq(range(10)))
    assert len(hits) == 2 and in_flight == 0
    # Freed before computing: nobody is computing those keys any more.
    other = seq(range(200, 212))
    blocks.allocate(other, [])
    blocks.free(other)
    assert blocks.lookup(seq(range(200, 212)))[1] == 0


def test_ensure_slots_grows_a_decoding_sequence_until_the_pool_is_full():
    blocks = BlockManager(2, 2)
    s = seq(range(2))
    blocks.allocate(s, [])
    s.num_cached = 2
    s.token_ids.append(7)
    assert blocks.ensure_slots(s) and len(s.block_table) == 2
    s.token_ids += [8, 9]
    assert not blocks.ensure_slots(s) and len(s.block_table) == 2


def test_prefix_caching_off_never_hits():
    blocks = BlockManager(8, 2, enable_prefix_caching=False)
    a = seq(range(6))
    blocks.allocate(a, [])
    computed(blocks, a)
    assert blocks.lookup(seq(range(6))) == ([], 0)
    blocks.free(a)
    assert blocks.num_free == 8


def test_the_routers_view_of_a_prompt_finds_the_blocks_its_replica_computed_images_included():
    """`affinity.cached_prompt_tokens` keys a prepared prompt as the block manager keys its
    sequence (the image's digest in every block from the image on): a key built otherwise would
    find nothing, silently, and every turn would go by load alone."""
    from models.prompt import PreparedPrompt
    from scheduler.affinity import cached_prompt_tokens

    holder, other = BlockManager(32, 4), BlockManager(32, 4)
    tokens = list(range(30))
    image = PromptSpan(9, 14, b"pixels-a")
    sequence = seq(tokens, image=image)
    holder.allocate(sequence, [])
    computed(holder, sequence)

    class Replica:
        def __init__(self, manager: BlockManager) -> None:
            self.block_manager = manager

    replicas = [Replica(holder), Replica(other)]

    def prepared(pixels: bytes, ids=tokens) -> PreparedPrompt:
        prompt = PreparedPrompt(list(ids), num_images=1)
        prompt.unsplit_span, prompt.span_digest = (9, 14), pixels
        return prompt

    held = cached_prompt_tokens(prepared(b"pixels-a"), replicas)
    assert held == {replicas[0]: 28}  # every full block but the one holding the last token
    # Another image in the same place: only the blocks before it.
    assert cached_prompt_tokens(prepared(b"pixels-b"), replicas) == {replicas[0]: 8}
    # A hit ending inside the image's span is cut back to its start, as the replica's lookup cuts
    # it (the span is computed in one chunk).
    assert cached_prompt_tokens(prepared(b"pixels-a", [*tokens[:12], *[999] * 18]), replicas) == {
        replicas[0]: 8
    }
    # A different first block: nothing, and one replica alone is not ranked at all.
    assert cached_prompt_tokens(prepared(b"pixels-a", [99, *tokens[1:]]), replicas) == {}
    assert cached_prompt_tokens(prepared(b"pixels-a"), replicas[:1]) == {}
