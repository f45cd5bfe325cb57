"""The paged KV pool of one replica: fixed-size blocks of keys and values, one pool per layer.

Per attention layer, keys and values are `[num_blocks + 2, block_size, kv_heads, head_dim]` (the
layout FlashAttention's paged kernels read; values may have their own head size). Which block belongs to which sequence is decided by
`scheduler.blocks`; here a block is just an index. Two extra blocks belong to no sequence: the
null block stays zero and pads block tables, so a gather never reads memory that no sequence
wrote; the scratch block takes the keys of the padding rows of a CUDA-graph decode step
(`models.graphs`).

The pool is allocated once, on the first forward pass (the startup self-test), with the head
shapes each layer actually produces, and zero-filled so its memory is committed at startup and the
process footprint does not creep up while serving. Its size comes from the memory budget.
"""

from __future__ import annotations

import torch


class PagedKVCache:
    def __init__(self, num_blocks: int, block_size: int, device: torch.device) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = device
        self.null_block = num_blocks  # all zeros; pads block tables
        self.scratch_block = num_blocks + 1  # written and read only by padding rows
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}

    def layer(
        self, layer_idx: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's pools, allocated on first use from the `[*, kv_heads, *, head_dim]` keys and
        values it produces (per-layer head shapes, and value heads narrower than key heads as in
        DeepSeek's MLA, need no special casing)."""
        keys = self._keys.get(layer_idx)
        if keys is None:
            keys = torch.zeros(self._shape(key), dtype=key.dtype, device=key.device)
            self._keys[layer_idx] = keys
            self._values[layer_idx] = torch.zeros(self._shape(value), dtype=value.dtype, device=value.device)
        return keys, self._values[layer_idx]

    def layer_pools(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pools of a layer that has already written to them."""
        return self._keys[layer_idx], self._values[layer_idx]

    def _shape(self, like: torch.Tensor) -> tuple[int, ...]:
        return (self.num_blocks + 2, self.block_size, like.shape[1], like.shape[-1])

    def zero_blocks(self, blocks: torch.Tensor) -> None:
        """Blocks just handed to a sequence: stale contents (possibly non-finite, from a request
        that failed) must not reach masked positions, where 0 * NaN would still be NaN."""
        for store in (self._keys, self._values):
            for pool in store.values():
                pool.index_fill_(0, blocks.to(pool.device), 0)

    def copy_blocks(self, sources: torch.Tensor, destinations: torch.Tensor) -> None:
        for store in (self._keys, self._values):
            for pool in store.values():
                pool.index_copy_(
                    0, destinations.to(pool.device), pool.index_select(0, sources.to(pool.device))
                )

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for store in (self._keys, self._values) for t in store.values()
        )

    @property
    def is_allocated(self) -> bool:
        return bool(self._keys)


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Keys and values of one position across all layers, from the text config (an estimate for
    exotic layouts: the pool itself is sized by what each layer actually produces)."""
    layers = _setting(config, "num_hidden_layers") or _setting(config, "n_layer") or 1
    per_layer = _setting(config, "per_layer_config")
    if per_layer is not None:
        # Heterogeneous configs (Gemma 4) refuse a global read of what varies by layer.
        return sum(_layer_kv_bytes(per_layer[index], dtype) for index in range(layers))
    return layers * _layer_kv_bytes(config, dtype)


def _setting(config, name: str):
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001 - a per-layer attribute read globally (AmbiguousGlobalPerLayerAttributeError)
        return None


def _layer_kv_bytes(config, dtype: torch.dtype) -> int:
    heads = _setting(config, "num_attention_heads") or _setting(config, "n_head") or 1
    kv_heads = _setting(config, "num_key_value_heads") or heads
    if _setting(config, "new_decoder_architecture"):
        # Falcon-40B/180B: grouped keys and values, though their configs also say multi_query.
        kv_heads = config.num_kv_heads
    elif _setting(config, "multi_query"):
        kv_heads = 1
    hidden = _setting(config, "hidden_size") or _setting(config, "n_embd") or 0
    head_dim = _setting(config, "head_dim") or hidden // max(heads, 1)
    key_dim = value_dim = head_dim
    if _setting(config, "v_head_dim") and _setting(config, "qk_nope_head_dim") is not None:
        # MLA (DeepSeek-V2/V3): the pool holds the keys and values the layers expand to, per head.
        kv_heads = heads
        key_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        value_dim = config.v_head_dim
    itemsize = torch.tensor([], dtype=dtype).element_size()
    return kv_heads * (key_dim + value_dim) * itemsize
