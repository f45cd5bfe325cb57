"""Preallocated per-slot KV cache for the fast path.

One row ("slot") per running sequence, per layer `[num_slots, kv_heads, capacity, head_dim]`.
New keys are written in place by index, so joining or leaving the batch never copies other rows
(the padded join/leave over `DynamicCache` copied the whole cache every step). Capacity grows by
doubling up to `max_len`, so memory follows the longest live sequence instead of the worst case.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(self, num_slots: int, max_len: int, device: torch.device, *, min_capacity: int = 256) -> None:
        self.num_slots = num_slots
        self.max_len = max_len
        self.device = device
        self.capacity = min(min_capacity, max_len)
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}

    def layer(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's key/value storage, allocated on first use from a `[*, kv_heads, *, head_dim]`
        sample so that models with per-layer head shapes need no special casing."""
        keys = self._keys.get(layer_idx)
        if keys is None:
            shape = (self.num_slots, like.shape[1], self.capacity, like.shape[-1])
            keys = torch.zeros(shape, dtype=like.dtype, device=self.device)
            self._keys[layer_idx] = keys
            self._values[layer_idx] = torch.zeros_like(keys)
        return keys, self._values[layer_idx]

    def reserve(self, length: int) -> None:
        """Make room for positions `[0, length)` in every slot before a forward pass."""
        if length <= self.capacity:
            return
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds the cache limit {self.max_len}")
        new_capacity = min(self.max_len, max(length, 2 * self.capacity))
        for store in (self._keys, self._values):
            for layer_idx, old in store.items():
                grown = old.new_zeros((*old.shape[:2], new_capacity, old.shape[-1]))
                grown[:, :, : self.capacity] = old
                store[layer_idx] = grown
        self.capacity = new_capacity

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
        self.capacity = min(256, self.max_len)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in (self._keys, self._values) for t in store.values())
