"""Attention over the per-slot KV cache, plugged into transformers' AttentionInterface.

The fast path runs one packed forward per scheduler step: `[1, T]` tokens made of one token per
decoding row followed by the prefill chunks of newcomers. Every attention layer of the text
decoder calls `slot_attention`, which writes the new keys/values into the slot cache and attends
each part appropriately. Layers outside the text decoder (vision towers) and calls without a
`StepLayout` (the reference forward used by the self-test) fall through to stock SDPA/eager.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from models.kv_cache import SlotKVCache

ATTENTION_NAME = "slot_cache"
# Attention kwargs that change the math in ways plain SDPA over the cache does not reproduce.
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks")


class FastPathUnsupported(RuntimeError):
    """The model asked the attention layer for something the slot cache cannot honour."""


@dataclass(frozen=True, slots=True)
class Segment:
    """A prefill chunk: `length` tokens at packed index `start`, cache positions `[offset, offset+length)`."""

    slot: int
    start: int
    length: int
    offset: int


@dataclass(slots=True)
class StepLayout:
    """How the packed tokens of one forward map onto cache slots; built once per step."""

    cache: SlotKVCache
    num_decode: int = 0
    decode_slots: torch.Tensor | None = None  # [Bd] long, slot of each decode token
    decode_positions: torch.Tensor | None = None  # [Bd] long, cache position written this step
    # Decode attends over slots [0, num_active); rows without a decode token get a dummy query.
    num_active: int = 0
    decode_is_dense: bool = True  # decode_slots == arange(num_active)
    decode_mask: torch.Tensor | None = None  # [num_active, 1, 1, L] bool
    decode_len: int = 0
    segments: list[Segment] = field(default_factory=list)
    sliding_masks: dict[int, torch.Tensor] = field(default_factory=dict)


def _fallback(module, query, key, value, attention_mask, **kwargs):
    fallback_name = getattr(module.config, "_slot_fallback_attn", "sdpa")
    fallback = ALL_ATTENTION_FUNCTIONS.get(fallback_name, sdpa_attention_forward)
    return fallback(module, query, key, value, attention_mask, **kwargs)


def _attend(query, key, value, mask, scaling, is_causal=False):
    # enable_gqa lets SDPA broadcast kv heads without materialising repeat_kv copies.
    gqa = query.shape[1] != key.shape[1]
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, is_causal=is_causal and mask is None, enable_gqa=gqa
    )


def _window_mask(positions_q: torch.Tensor, length: int, window: int | None, device) -> torch.Tensor:
    """[Q, length] bool: causal, and within the sliding window when the layer has one."""
    keys = torch.arange(length, device=device)
    mask = keys[None, :] <= positions_q[:, None]
    if window is not None:
        mask &= keys[None, :] > positions_q[:, None] - window
    return mask


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    layout: StepLayout | None = kwargs.get("slot_layout")
    layer_idx = getattr(module, "layer_idx", None)
    if layout is None or layer_idx is None:
        return _fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise FastPathUnsupported(f"attention uses '{name}'")
    if not getattr(module, "is_causal", True) or key.shape[2] != query.shape[2]:
        raise FastPathUnsupported("non-causal or cross attention")
    window = kwargs.get("sliding_window")

    # query: [1, H, T, D]; key/value: [1, Hkv, T, D]
    cache_k, cache_v = layout.cache.layer(layer_idx, key)
    parts = []
    nd = layout.num_decode
    if nd:
        parts.append(_decode_attention(layout, cache_k, cache_v, query, key, value, scaling, window))
    if layout.segments:
        parts.append(_prefill_attention(layout, cache_k, cache_v, query, key, value, scaling, window))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)  # [1, H, T, D]
    return out.transpose(1, 2).contiguous(), None


def _decode_attention(layout, cache_k, cache_v, query, key, value, scaling, window):
    nd = layout.num_decode
    # Scatter this step's key/value of every decoding row to (slot, position).
    new_k = key[0, :, :nd].transpose(0, 1)  # [Bd, Hkv, D]
    new_v = value[0, :, :nd].transpose(0, 1)
    cache_k[layout.decode_slots, :, layout.decode_positions] = new_k
    cache_v[layout.decode_slots, :, layout.decode_positions] = new_v

    length, active = layout.decode_len, layout.num_active
    q = query[0, :, :nd].transpose(0, 1).unsqueeze(2)  # [Bd, H, 1, D]
    if not layout.decode_is_dense:
        dense = q.new_zeros((active, *q.shape[1:]))
        dense[layout.decode_slots] = q
        q = dense
    mask = layout.decode_mask
    if window is not None:
        mask = layout.sliding_masks.get(window)
        if mask is None:
            positions = torch.zeros(active, dtype=torch.long, device=q.device)
            positions[layout.decode_slots] = layout.decode_positions
            mask = _window_mask(positions, length, window, q.device)[:, None, None, :]
            layout.sliding_masks[window] = mask
    out = _attend(q, cache_k[:active, :, :length], cache_v[:active, :, :length], mask, scaling)
    if not layout.decode_is_dense:
        out = out[layout.decode_slots]
    return out.squeeze(2).transpose(0, 1).unsqueeze(0)  # [1, H, Bd, D]


def _prefill_attention(layout, cache_k, cache_v, query, key, value, scaling, window):
    for seg in layout.segments:
        src = slice(seg.start, seg.start + seg.length)
        dst = slice(seg.offset, seg.offset + seg.length)
        cache_k[seg.slot, :, dst] = key[0, :, src]
        cache_v[seg.slot, :, dst] = value[0, :, src]

    # One SDPA per chunk: a block-diagonal mask over all packed chunks would cost T^2 instead of
    # the sum of each chunk's own square (16 prompts of 250 tokens: 16x more attention work).
    outs = []
    for seg in layout.segments:
        q = query[:, :, seg.start : seg.start + seg.length]
        if seg.offset == 0 and window is None:
            # A new sequence attends only to its own keys: plain causal attention, no mask tensor.
            k = key[:, :, seg.start : seg.start + seg.length]
            v = value[:, :, seg.start : seg.start + seg.length]
            outs.append(_attend(q, k, v, None, scaling, is_causal=True))
            continue
        total = seg.offset + seg.length
        k = cache_k[seg.slot : seg.slot + 1, :, :total]
        v = cache_v[seg.slot : seg.slot + 1, :, :total]
        positions = torch.arange(seg.offset, total, device=q.device)
        mask = _window_mask(positions, total, window, q.device)[None, None]
        outs.append(_attend(q, k, v, mask, scaling))
    return torch.cat(outs, dim=2)


def register() -> None:
    """Idempotent: the registry is process-wide, the function is stateless."""
    AttentionInterface.register(ATTENTION_NAME, slot_attention)
