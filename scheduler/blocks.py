"""The KV block manager: which fixed-size blocks of the replica's KV pool each sequence owns.

Pure bookkeeping (the tensors live in `models.kv_cache`). Blocks have reference counts: full
blocks of a prompt are shared by the choices of an n > 1 request and, with prefix caching, by any
later request whose tokens start the same way. As in vLLM, a full block is identified by a key
chained over the blocks before it (the previous key's hash, its own tokens, and a digest of the
images its tokens stand for), so a key names the whole prefix up to the end of the block.

Free blocks come in two kinds: never cached (a stack, so the same few blocks are reused and a
lazily committed pool stays small) and cached but unreferenced (kept for prefix hits, evicted
least recently used first, only when the stack is empty).
"""

from __future__ import annotations

from collections import Counter, OrderedDict

from scheduler.sequence import Sequence

BlockKey = tuple  # (hash of the previous block's key, or the salt; token ids; span digest or None)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("a KV pool needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._refs = [0] * num_blocks
        self._key_of: list[BlockKey | None] = [None] * num_blocks
        self._cached: dict[BlockKey, int] = {}
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out block 0 first
        self._evictable: OrderedDict[int, None] = OrderedDict()
        # Keys that running sequences will compute: a waiting request that needs one of them
        # waits for it instead of computing the same prefix again.
        self._pending: Counter[BlockKey] = Counter()
        self._fresh: list[int] = []
        self.query_tokens = 0  # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0  # of which found

    # -- capacity ------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix keys ---------------------------------------------------------------------------
    def _key(self, seq: Sequence, index: int, previous: BlockKey | None) -> BlockKey:
        size = self.block_size
        tokens = tuple(seq.token_ids[index * size : (index + 1) * size])
        span = seq.span
        digest = span.digest if span is not None and (index + 1) * size > span.first else None
        return (seq.cache_salt if previous is None else hash(previous), tokens, digest)

    def keys_of(self, seq: Sequence) -> list[BlockKey]:
        """Keys of every full block of the sequence's tokens (cached on the sequence)."""
        cached = seq._keys_cache
        if cached is not None and cached[0] == seq.num_tokens:
            return cached[1]
        keys = list(seq.block_keys)
        for index in range(len(keys), seq.num_tokens // self.block_size):
            keys.append(self._key(seq, index, keys[-1] if keys else None))
        seq._keys_cache = (seq.num_tokens, keys)
        return keys

    def lookup(self, seq: Sequence) -> tuple[list[int], int]:
        """Cached blocks for the longest prefix of a waiting sequence, and how many blocks after
        them running sequences are computing right now (hits a few steps from now)."""
        if not self.enable_prefix_caching:
            return [], 0
        keys = self.keys_of(seq)
        hits: list[int] = []
        for key in keys:
            block = self._cached.get(key)
            if block is None:
                break
            hits.append(block)
        # The last prompt token is always computed: its logits give the first new token.
        limit = (seq.num_tokens - 1) // self.block_size
        span = seq.span
        if span is not None and span.first < min(len(hits), limit) * self.block_size <= span.last:
            # A hit may not end inside the span: it is computed in one chunk. Checked where the
            # hit ends once cut to `limit`: a prompt of whole blocks whose span reaches into its
            # last block would otherwise pass with every block and be cut inside the span.
            limit = min(limit, span.first // self.block_size)
        hits = hits[:limit]
        in_flight = 0
        for key in keys[len(hits) : limit]:
            if self._pending.get(key, 0) <= 0:
                break
            in_flight += 1
        if span is not None and span.first < (len(hits) + in_flight) * self.block_size <= span.last:
            in_flight = max(0, span.first // self.block_size - len(hits))  # nor a hit still to come
        return hits, in_flight

    # -- allocation ----------------------------------------------------------------------------
    def cost(self, seq: Sequence, hits: list[int]) -> int:
        """Free blocks that admitting `seq` with these prefix hits would take."""
        revived = sum(1 for block in hits if self._refs[block] == 0)
        return self.blocks_for(seq.num_tokens) - len(hits) + revived + self.blocks_for(seq.side_tokens)

    def allocate(self, seq: Sequence, hits: list[int]) -> None:
        """Blocks for all of `seq`'s tokens: the prefix hits shared, the rest new."""
        if seq.block_table:
            raise RuntimeError(f"{seq} already holds blocks")
        for block in hits:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        new = [self._take() for _ in range(self.blocks_for(seq.num_tokens) - len(hits))]
        seq.block_table = hits + new
        seq.num_cached = len(hits) * self.block_size
        seq.side_table = [self._take() for _ in range(self.blocks_for(seq.side_tokens))]
        seq.side_filled = False
        if self.enable_prefix_caching:
            keys = self.keys_of(seq)
            seq.block_keys = keys[: len(hits)]
            seq.pending_end = len(keys)
            self._pending.update(keys[len(hits) :])
            self.query_tokens += seq.num_tokens
            self.hit_tokens += seq.num_cached

    def share_prompt(self, parent: Sequence, child: Sequence) -> int | None:
        """Give a not-yet-running choice of an n > 1 request the parent's full prompt blocks and a
        block of its own for the partial last one. Returns that block (filled by a copy when the
        parent's prompt is computed), or None when the prompt ends on a block boundary."""
        full = parent.num_tokens // self.block_size
        shared = parent.block_table[:full]
        for block in shared:
            self._refs[block] += 1
        own = self._take() if parent.num_tokens % self.block_size else None
        child.block_table = shared + ([own] if own is not None else [])
        # The choices read the same side slots (the same images); the parent fills them before
        # any choice runs.
        for block in parent.side_table:
            self._refs[block] += 1
        child.side_table = list(parent.side_table)
        child.side_filled = True
        return own

    def fork_cost(self, seq: Sequence) -> int:
        return 1 if seq.num_tokens % self.block_size else 0

    def ensure_slots(self, seq: Sequence) -> bool:
        """Blocks for every token of `seq` (a decode step needs one more now and then); False
        when none is free."""
        missing = self.blocks_for(seq.num_tokens) - len(seq.block_table)
        if missing > self.num_free:
            return False
        seq.block_table.extend(self._take() for _ in range(missing))
        return True

    def register(self, seq: Sequence) -> None:
        """Make the blocks `seq` has just filled available to prefix hits."""
        if not self.enable_prefix_caching:
            return
        keys = seq.block_keys
        for index in range(len(keys), seq.num_cached // self.block_size):
            key = self._key(seq, index, keys[-1] if keys else None)
            keys.append(key)
            if index < seq.pending_end:
                self._unpend(key)
            block = seq.block_table[index]
            if key not in self._cached and self._key_of[block] is None:
                self._cached[key] = block
                self._key_of[block] = key

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks nobody else holds become free (cached ones
        stay available to prefix hits until evicted). The tail goes first, so on eviction a
        prompt's later blocks leave before the prefix other requests are likelier to share."""
        if self.enable_prefix_caching:
            for key in self.keys_of(seq)[len(seq.block_keys) : seq.pending_end]:
                self._unpend(key)
            seq.pending_end = 0
        for block in [*seq.side_table, *reversed(seq.block_table)]:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if self._key_of[block] is not None:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        seq.block_table = []
        seq.side_table = []
        seq.block_keys = []
        seq.num_cached = 0

    def _unpend(self, key: BlockKey) -> None:
        count = self._pending.get(key, 0)
        if count > 1:
            self._pending[key] = count - 1
        elif count == 1:
            del self._pending[key]

    def take_fresh(self) -> list[int]:
        """Blocks handed out since the last call (the runner zeroes them before use)."""
        fresh, self._fresh = self._fresh, []
        return fresh

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._key_of[block]]
            self._key_of[block] = None
        self._refs[block] = 1
        self._fresh.append(block)
        return block

    # -- invariants (tests) --------------------------------------------------------------------
    def check(self, tables: list[list[int]]) -> None:
        """Raises AssertionError unless the books balance for these live block tables: every
        block is used or free (never both, never twice), reference counts equal the number of
        tables holding the block, and cached keys point at blocks that carry them."""
        held = Counter(block for table in tables for block in table)
        free = list(self._free) + list(self._evictable)
        if len(free) != len(set(free)):
            raise AssertionError("a block is free twice")
        if set(free) & set(held):
            raise AssertionError(f"blocks both free and held: {sorted(set(free) & set(held))}")
        if len(free) + len(held) != self.num_blocks:
            raise AssertionError(f"free {len(free)} + used {len(held)} != {self.num_blocks} blocks")
        for block in range(self.num_blocks):
            if self._refs[block] != held.get(block, 0):
                raise AssertionError(
                    f"block {block}: ref count {self._refs[block]}, held by {held.get(block, 0)} tables"
                )
        for key, block in self._cached.items():
            if self._key_of[block] != key:
                raise AssertionError(f"cached key of block {block} does not match")
        if any(self._key_of[block] is None for block in self._evictable):
            raise AssertionError("an evictable block has no key")
