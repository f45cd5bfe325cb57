"""Attention over the paged KV pool, plugged into transformers' AttentionInterface.

The fast path runs one packed forward per step: `[1, T]` tokens, one per decoding sequence first,
then the prefill chunks. Every attention layer of the text decoder calls `paged_attention`, which
writes the step's keys and values into the pool by slot mapping and then attends:

- FlashAttention 2 (GPU, fp16/bf16, `flash_attn` installed, block size a multiple of 256 as its
  paged kernels require): one varlen call over every row, reading the pool through block tables.
- Otherwise gather + SDPA (CPU, and GPUs without FlashAttention): decode rows gather their blocks
  into `[rows, kv_heads, blocks * block_size, head_dim]` and run one masked SDPA; each prefill
  chunk runs its own SDPA (plain causal when it starts the sequence, over its gathered blocks
  when earlier tokens are cached), so attention costs the sum of the chunks' squares, not T^2.

Layers outside the text decoder (vision towers) and calls without a layout (the self-test's
reference forward) fall through to the model's own attention.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from models.kv_cache import PagedKVCache

ATTENTION_NAME = "paged"
LAYOUT_KWARG = "paged_layout"
# Attention kwargs that change the math in ways plain SDPA over the pool does not reproduce.
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks")
FLASH_BLOCK_MULTIPLE = 256


class FastPathUnsupported(RuntimeError):
    """The model asked the attention layer for something the paged fast path cannot honour."""


def flash_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and importlib.util.find_spec("flash_attn") is not None
    )


@dataclass(slots=True)
class PrefillSegment:
    """A prefill chunk: `length` tokens at packed index `start`, cache positions from `offset`."""

    start: int
    length: int
    offset: int
    blocks: torch.Tensor | None  # [num_blocks] its blocks up to offset + length; None when offset == 0


@dataclass(slots=True)
class DecodeGroup:
    """Decode rows of similar length, attended together: their block tables padded to the
    longest in the group (with the null block), so padding never exceeds the group's own keys."""

    rows: torch.Tensor | None  # [g] indices among the step's decode rows; None: all of them, in order
    blocks: torch.Tensor  # [g, nb] long
    positions: torch.Tensor  # [g] long: position of each query
    masks: dict = field(default_factory=dict)  # per sliding window, shared by all layers

    def mask(self, block_size: int, window: int | None) -> torch.Tensor:
        """[g, 1, 1, nb * block_size] bool: each row sees its own positions up to itself."""
        mask = self.masks.get(window)
        if mask is None:
            mask = _causal_mask(self.positions, self.blocks.shape[1] * block_size, window)[:, None, None, :]
            self.masks[window] = mask
        return mask


@dataclass(slots=True)
class FlashMetadata:
    cu_seqlens_q: torch.Tensor  # [rows + 1] int32
    cu_seqlens_k: torch.Tensor  # [rows + 1] int32
    max_seqlen_q: int
    max_seqlen_k: int
    block_table: torch.Tensor  # [rows, max_blocks] int32


@dataclass(slots=True)
class PagedLayout:
    """How the packed tokens of one forward map onto the pool; built once per step."""

    cache: PagedKVCache
    slot_mapping: torch.Tensor  # [T] long: pool slot (block * block_size + offset) of each token
    num_decode: int = 0
    decode_groups: list[DecodeGroup] = field(default_factory=list)
    segments: list[PrefillSegment] = field(default_factory=list)
    flash: FlashMetadata | None = None
    _masks: dict = field(default_factory=dict)  # per (segment, sliding window), shared by all layers

    def segment_mask(self, index: int, window: int | None) -> torch.Tensor:
        mask = self._masks.get((index, window))
        if mask is None:
            seg = self.segments[index]
            length = (
                seg.offset + seg.length if seg.blocks is None else seg.blocks.shape[0] * self.cache.block_size
            )
            positions = torch.arange(seg.offset, seg.offset + seg.length, device=self.slot_mapping.device)
            mask = _causal_mask(positions, length, window)[None, None]
            self._masks[(index, window)] = mask
        return mask


def _causal_mask(positions_q: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
    """[Q, length] bool: causal, and within the sliding window when the layer has one."""
    keys = torch.arange(length, device=positions_q.device)
    mask = keys[None, :] <= positions_q[:, None]
    if window is not None:
        mask &= keys[None, :] > positions_q[:, None] - window
    return mask


def _fallback(module, query, key, value, attention_mask, **kwargs):
    fallback_name = getattr(module.config, "_paged_fallback_attn", "sdpa")
    fallback = ALL_ATTENTION_FUNCTIONS.get(fallback_name, sdpa_attention_forward)
    return fallback(module, query, key, value, attention_mask, **kwargs)


def _attend(query, key, value, mask, scaling, is_causal=False):
    # enable_gqa lets SDPA broadcast kv heads without materialising repeat_kv copies.
    gqa = query.shape[1] != key.shape[1]
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, is_causal=is_causal and mask is None, enable_gqa=gqa
    )


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    layout: PagedLayout | None = kwargs.get(LAYOUT_KWARG)
    layer_idx = getattr(module, "layer_idx", None)
    if layout is None or layer_idx is None:
        return _fallback(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise FastPathUnsupported(f"attention uses '{name}'")
    if not getattr(module, "is_causal", True) or key.shape[2] != query.shape[2]:
        raise FastPathUnsupported("non-causal or cross attention")
    window = kwargs.get("sliding_window")

    # query: [1, H, T, D]; key/value: [1, Hkv, T, D]; pools: [blocks + 1, block_size, Hkv, D]
    key_pool, value_pool = layout.cache.layer(layer_idx, key)
    key_pool.view(-1, *key_pool.shape[2:]).index_copy_(0, layout.slot_mapping, key[0].transpose(0, 1))
    value_pool.view(-1, *value_pool.shape[2:]).index_copy_(0, layout.slot_mapping, value[0].transpose(0, 1))
    if layout.flash is not None:
        out = _flash_attention(layout.flash, query, key_pool, value_pool, scaling, window)
    else:
        parts = []
        if layout.num_decode:
            parts.append(_decode_attention(layout, key_pool, value_pool, query, scaling, window))
        if layout.segments:
            parts.append(_prefill_attention(layout, key_pool, value_pool, query, key, value, scaling, window))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)  # [1, H, T, D]
    return out.transpose(1, 2).contiguous(), None


def _gather(pool: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """`blocks` [..., nb] -> [..., Hkv, nb * block_size, D]: whole blocks copied at once
    (index_select along the block dimension copies about twice as fast on CPU as indexing)."""
    gathered = pool.index_select(0, blocks.flatten())  # [(...) * nb, block_size, Hkv, D]
    gathered = gathered.view(*blocks.shape[:-1], blocks.shape[-1] * pool.shape[1], *pool.shape[2:])
    return gathered.transpose(-3, -2)


def _decode_attention(layout: PagedLayout, key_pool, value_pool, query, scaling, window):
    nd = layout.num_decode
    q = query[0, :, :nd].transpose(0, 1).unsqueeze(2)  # [Bd, H, 1, D]
    block_size = layout.cache.block_size
    if len(layout.decode_groups) == 1:
        group = layout.decode_groups[0]
        out = _attend(
            q,
            _gather(key_pool, group.blocks),
            _gather(value_pool, group.blocks),
            group.mask(block_size, window),
            scaling,
        )
    else:
        out = torch.empty_like(q)
        for group in layout.decode_groups:
            keys = _gather(key_pool, group.blocks)  # [g, Hkv, L, D]
            values = _gather(value_pool, group.blocks)
            out[group.rows] = _attend(q[group.rows], keys, values, group.mask(block_size, window), scaling)
    return out.squeeze(2).transpose(0, 1).unsqueeze(0)  # [1, H, Bd, D]


def _prefill_attention(layout: PagedLayout, key_pool, value_pool, query, key, value, scaling, window):
    outs = []
    for index, seg in enumerate(layout.segments):
        span = slice(seg.start, seg.start + seg.length)
        q = query[:, :, span]
        if seg.blocks is None:
            # The chunk starts its sequence: it attends only to its own keys, no gather needed.
            mask = None if window is None else layout.segment_mask(index, window)
            outs.append(_attend(q, key[:, :, span], value[:, :, span], mask, scaling, is_causal=True))
            continue
        keys = _gather(key_pool, seg.blocks).unsqueeze(0)  # [1, Hkv, L, D]
        values = _gather(value_pool, seg.blocks).unsqueeze(0)
        outs.append(_attend(q, keys, values, layout.segment_mask(index, window), scaling))
    return torch.cat(outs, dim=2)


def _flash_attention(meta: FlashMetadata, query, key_pool, value_pool, scaling, window):
    from flash_attn import flash_attn_varlen_func

    q = query[0].transpose(0, 1)  # [T, H, D]
    out = flash_attn_varlen_func(
        q,
        key_pool,
        value_pool,
        cu_seqlens_q=meta.cu_seqlens_q,
        cu_seqlens_k=meta.cu_seqlens_k,
        max_seqlen_q=meta.max_seqlen_q,
        max_seqlen_k=meta.max_seqlen_k,
        softmax_scale=scaling,
        causal=True,
        window_size=(window - 1, 0) if window is not None else (-1, -1),
        block_table=meta.block_table,
    )  # [T, H, D]
    return out.transpose(0, 1).unsqueeze(0)  # [1, H, T, D]


def register() -> None:
    """Idempotent: the registry is process-wide, the function is stateless."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention)
