"""Preallocated per-slot KV cache for the fast path.

One row ("slot") per running sequence, per layer `[rows, kv_heads, capacity, head_dim]`. New keys
are written in place by index, so joining or leaving the batch never copies other rows (padded
join/leave over `DynamicCache` concatenates the cache every step). Both dimensions grow by
doubling, up to `num_slots` rows and `max_len` positions, so memory follows what is live: one
long request alone costs one long row, not `num_slots` of them.

`fits()` lets the runner refuse to admit a sequence whose worst case (prompt plus max_tokens)
would push the cache past its memory budget; it waits until others finish instead of running
the device out of memory mid-batch.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(
        self,
        num_slots: int,
        max_len: int,
        device: torch.device,
        *,
        bytes_per_token: int,
        budget_bytes: int | None = None,
        min_capacity: int = 256,
        min_rows: int = 4,
    ) -> None:
        self.num_slots = num_slots
        self.max_len = max_len
        self.device = device
        self.bytes_per_token = bytes_per_token  # all layers, keys and values, one position of one row
        self.budget_bytes = budget_bytes
        self._min_capacity = min(min_capacity, max_len)
        self._min_rows = min(min_rows, num_slots)
        self.capacity = self._min_capacity
        self.rows = self._min_rows
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}

    def layer(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's key/value storage, allocated on first use from a `[*, kv_heads, *, head_dim]`
        sample so that models with per-layer head shapes need no special casing."""
        keys = self._keys.get(layer_idx)
        if keys is None:
            shape = (self.rows, like.shape[1], self.capacity, like.shape[-1])
            keys = torch.zeros(shape, dtype=like.dtype, device=self.device)
            self._keys[layer_idx] = keys
            self._values[layer_idx] = torch.zeros_like(keys)
        return keys, self._values[layer_idx]

    @staticmethod
    def _grown(current: int, needed: int, limit: int) -> int:
        return current if needed <= current else min(limit, max(needed, 2 * current))

    def projected_bytes(self, rows: int, length: int) -> int:
        rows = self._grown(self.rows, rows, self.num_slots)
        length = self._grown(self.capacity, min(length, self.max_len), self.max_len)
        return rows * length * self.bytes_per_token

    def fits(self, rows: int, length: int) -> bool:
        return self.budget_bytes is None or self.projected_bytes(rows, length) <= self.budget_bytes

    def reserve(self, rows: int, length: int) -> None:
        """Make room for slots `[0, rows)` and positions `[0, length)` before a forward pass."""
        if length > self.max_len or rows > self.num_slots:
            raise ValueError(f"cache request ({rows} rows, {length} positions) exceeds its limits")
        new_rows = self._grown(self.rows, rows, self.num_slots)
        new_capacity = self._grown(self.capacity, length, self.max_len)
        if (new_rows, new_capacity) == (self.rows, self.capacity):
            return
        for store in (self._keys, self._values):
            for layer_idx, old in store.items():
                grown = old.new_zeros((new_rows, old.shape[1], new_capacity, old.shape[-1]))
                grown[: self.rows, :, : self.capacity] = old
                store[layer_idx] = grown
        self.rows, self.capacity = new_rows, new_capacity

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (compaction and forks)."""
        if src == dst or length <= 0:
            return
        for store in (self._keys, self._values):
            for tensor in store.values():
                tensor[dst, :, :length] = tensor[src, :, :length]

    def release_memory(self) -> None:
        """Drop storage when the replica goes idle so a burst of long requests does not pin memory."""
        self._keys.clear()
        self._values.clear()
        self.capacity, self.rows = self._min_capacity, self._min_rows

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in (self._keys, self._values) for t in store.values())
