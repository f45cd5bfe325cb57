"""Attention over the paged KV pool, plugged into transformers' AttentionInterface.

The fast path runs one packed forward per step: `[1, T]` tokens, one per decoding sequence first,
then the prefill chunks. Every attention layer of the text decoder calls `paged_attention`, which
writes the step's keys and values into the pool by slot mapping and then attends:

- FlashAttention 2 (`models.flash_paged`; GPU, fp16/bf16, `flash_attn` installed, block size a
  multiple of 256 as its paged kernels require): one varlen call over every row, reading the pool
  through block tables.
- Otherwise gather + SDPA (CPU, and GPUs without FlashAttention): decode rows gather their blocks
  into `[rows, kv_heads, blocks * block_size, head_dim]` and run one masked SDPA; each prefill
  chunk runs its own SDPA (plain causal when it starts the sequence, over its gathered blocks
  when earlier tokens are cached), so attention costs the sum of the chunks' squares, not T^2.

What each layer sees is the model's own rule, reproduced per row: causal, within the layer's
sliding window (from the call, or from `config.layer_types` for models that apply it only through
their mask), within its attention chunk (Llama 4), plus spans of a prompt that attend both ways
(Gemma 3's image tokens, PaliGemma's prefix); soft-capped logits and attention sinks go through
an explicit softmax, as the models' eager attention computes them; a bias over key positions
(Falcon's ALiBi, `models.falcon`) turns the masks into additive ones, built once per step.

The step's layout reaches the layers through a thread-local set around the forward (some decoder
layers, StableLM's, do not pass extra keyword arguments on to attention). Layers outside the text
decoder (vision towers) and forwards without a layout (the self-test's reference) fall through to
the model's own attention.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from models import cpu_attention
from models.flash_paged import FlashDecode, FlashMetadata, flash_decode_attention, flash_varlen_attention
from models.kv_cache import PagedKVCache

ATTENTION_NAME = "paged"
_local = threading.local()


class FastPathUnsupported(RuntimeError):
    """The model asked the attention layer for something the paged fast path cannot honour."""


@dataclass(frozen=True, slots=True)
class LayerRule:
    """Which keys a layer's query may see besides causality: the last `window` positions (itself
    included), and only keys of its own `chunk`-sized block of positions."""

    window: int | None = None
    chunk: int | None = None


FULL = LayerRule()


def layer_rules(text_config) -> dict[int, LayerRule]:
    """Per layer, the rule its mask applies, read from `config.layer_types` (a window passed in the
    attention call takes precedence: Mistral passes one and has no layer types)."""
    rules: dict[int, LayerRule] = {}
    for index, kind in enumerate(getattr(text_config, "layer_types", None) or ()):
        if kind == "sliding_attention" and getattr(text_config, "sliding_window", None):
            rules[index] = LayerRule(window=int(text_config.sliding_window))
        elif kind == "chunked_attention" and getattr(text_config, "attention_chunk_size", None):
            rules[index] = LayerRule(chunk=int(text_config.attention_chunk_size))
    return rules


# `key_bias(length, device, dtype)` -> [heads, length]: what a layer adds to the scaled scores of
# keys at positions 0..length-1, whatever the query (Falcon's ALiBi, `models.falcon`).
KeyBias = Callable[[int, torch.device, torch.dtype], torch.Tensor]


def _allowed(
    positions_q: torch.Tensor, length: int, rule: LayerRule, spans: tuple[tuple[int, int], ...] = ()
) -> torch.Tensor:
    """[Q, length] bool: which of the first `length` positions each query may see."""
    keys = torch.arange(length, device=positions_q.device)
    q = positions_q[:, None]
    allowed = keys[None, :] <= q
    if rule.window is not None:
        allowed &= keys[None, :] > q - rule.window
    if rule.chunk is not None:
        allowed &= keys[None, :] >= torch.div(q, rule.chunk, rounding_mode="floor") * rule.chunk
    # As transformers composes them: the spans widen the layer's causal (windowed) rule.
    for first, end in spans:
        inside_q = (positions_q >= first) & (positions_q < end)
        inside_k = (keys >= first) & (keys < end)
        allowed |= inside_q[:, None] & inside_k[None, :]
    return allowed


@dataclass(slots=True)
class PrefillSegment:
    """A prefill chunk: `length` tokens at packed index `start`, cache positions from `offset`.
    `spans`: position ranges `[first, end)` inside the chunk whose tokens attend both ways."""

    start: int
    length: int
    offset: int
    blocks: torch.Tensor | None  # [num_blocks] its blocks up to offset + length; None when offset == 0
    spans: tuple[tuple[int, int], ...] = ()


@dataclass(slots=True)
class DecodeGroup:
    """Decode rows of similar length, attended together: their block tables padded to the
    longest in the group (with the null block), so padding never exceeds the group's own keys."""

    rows: torch.Tensor | None  # [g] indices among the step's decode rows; None: all of them, in order
    blocks: torch.Tensor  # [g, nb] long
    positions: torch.Tensor  # [g] long: position of each query
    masks: dict = field(default_factory=dict)  # per layer rule and key bias, shared by all layers

    def mask(self, block_size: int, rule: LayerRule, bias: KeyBias | None = None, dtype=None) -> torch.Tensor:
        """[g, 1, 1, nb * block_size] bool: each row sees its own positions up to itself; with a
        `bias`, [g, heads, 1, nb * block_size] additive in `dtype`."""
        mask = self.masks.get((rule, bias, dtype))
        if mask is None:
            if bias is None:
                mask = _allowed(self.positions, self.blocks.shape[1] * block_size, rule)[:, None, None, :]
            else:
                mask = _biased(self.mask(block_size, rule), bias, dtype)
            self.masks[(rule, bias, dtype)] = mask
        return mask

    def key_range(self, rule: LayerRule) -> tuple[torch.Tensor, torch.Tensor]:
        """([g], [g]) long: the first position each row may see under `rule`, and its key count
        (the mask's allowed positions, as a range)."""
        bounds = self.masks.get(("range", rule))
        if bounds is None:
            first = torch.zeros_like(self.positions)
            if rule.window is not None:
                first = torch.maximum(first, self.positions - (rule.window - 1))
            if rule.chunk is not None:
                first = torch.maximum(
                    first, torch.div(self.positions, rule.chunk, rounding_mode="floor") * rule.chunk
                )
            bounds = (first.contiguous(), (self.positions + 1).contiguous())
            self.masks[("range", rule)] = bounds
        return bounds


@dataclass(frozen=True, slots=True)
class ObservedCall:
    """What one attention layer's call in a step asked for: its rule (window from the call or the
    config), its scaling, and whether it was plain attention (no soft-capping, sinks, key bias or
    query temperature)."""

    rule: LayerRule
    scaling: float | None
    plain: bool


@dataclass(slots=True)
class PagedLayout:
    """How the packed tokens of one forward map onto the pool; built once per step."""

    cache: PagedKVCache
    slot_mapping: torch.Tensor  # [T] long: pool slot (block * block_size + offset) of each token
    positions: torch.Tensor  # [T] long: each token's position in its own sequence
    rules: dict[int, LayerRule] = field(default_factory=dict)  # per layer index; FULL if absent
    # The model's masks let declared spans attend both ways (`models.arch`): its attention modules
    # may then say they are not causal (PaliGemma's), the masks here reproduce what they do.
    declared_spans: bool = False
    in_place_decode: bool = False  # decode rows through `models.cpu_attention` where it applies
    num_decode: int = 0
    decode_groups: list[DecodeGroup] = field(default_factory=list)
    segments: list[PrefillSegment] = field(default_factory=list)
    flash: FlashMetadata | None = None
    flash_decode: FlashDecode | None = None
    cross: Any = None  # what cross-attention layers read this step (`models.cross_attention.CrossStep`)
    # When a dict: each attention layer's call records what it did (`models.lean_decode` reads it).
    observed: dict | None = None
    _masks: dict = field(default_factory=dict)  # per (segment, rule), shared by all layers
    _elsewhere: dict = field(default_factory=dict)  # copies for layers on other GPUs, per device

    def on(self, device: torch.device) -> PagedLayout:
        """This layout with its tensors on `device`: the layers of a replica spread over several
        GPUs (`GPUS_PER_REPLICA`) read the step's layout where their KV pool is. One copy per
        device per step, shared by the layers there."""
        if device == self.slot_mapping.device:
            return self
        copy = self._elsewhere.get(device)
        if copy is None:

            def move(value):
                return value.to(device) if isinstance(value, torch.Tensor) else value

            copy = PagedLayout(
                self.cache,
                move(self.slot_mapping),
                move(self.positions),
                rules=self.rules,
                declared_spans=self.declared_spans,
                in_place_decode=self.in_place_decode,
                num_decode=self.num_decode,
                decode_groups=[
                    DecodeGroup(move(g.rows), move(g.blocks), move(g.positions)) for g in self.decode_groups
                ],
                segments=[
                    PrefillSegment(s.start, s.length, s.offset, move(s.blocks), s.spans)
                    for s in self.segments
                ],
                cross=self.cross,
                observed=self.observed,
                flash=None
                if self.flash is None
                else FlashMetadata(
                    move(self.flash.cu_seqlens_q),
                    move(self.flash.cu_seqlens_k),
                    self.flash.max_seqlen_q,
                    self.flash.max_seqlen_k,
                    move(self.flash.block_table),
                ),
            )
            self._elsewhere[device] = copy
        return copy

    def segment_mask(
        self, index: int, rule: LayerRule, bias: KeyBias | None = None, dtype=None
    ) -> torch.Tensor:
        """[1, 1, Q, L] bool; with a `bias`, [1, heads, Q, L] additive in `dtype`."""
        if bias is not None:
            mask = self._masks.get((index, rule, bias, dtype))
            if mask is None:
                mask = _biased(self.segment_mask(index, rule), bias, dtype)
                self._masks[(index, rule, bias, dtype)] = mask
            return mask
        mask = self._masks.get((index, rule))
        if mask is None:
            seg = self.segments[index]
            length = (
                seg.offset + seg.length if seg.blocks is None else seg.blocks.shape[0] * self.cache.block_size
            )
            positions = self.positions[seg.start : seg.start + seg.length]
            mask = _allowed(positions, length, rule, seg.spans)[None, None]
            self._masks[(index, rule)] = mask
        return mask


def _biased(allowed: torch.Tensor, bias: KeyBias, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask [..., 1, Q, L] as an additive one [..., heads, Q, L]: the bias where allowed,
    the dtype's minimum elsewhere (as Falcon fills its own mask)."""
    values = bias(allowed.shape[-1], allowed.device, dtype)[:, None, :]  # [heads, 1, L]
    return torch.where(allowed, values, torch.finfo(dtype).min)


@contextlib.contextmanager
def use_layout(layout: PagedLayout) -> Iterator[None]:
    """Make `layout` the one this thread's attention layers read during a forward."""
    _local.layout = layout
    try:
        yield
    finally:
        _local.layout = None


def current_layout() -> PagedLayout | None:
    """The layout of the packed step this thread is running, None outside one: for attention
    modules that replace their whole forward (`models.falcon`, `models.cross_attention`) rather
    than the attention call."""
    return getattr(_local, "layout", None)


def _fallback(module, query, key, value, attention_mask, **kwargs):
    fallback_name = getattr(module.config, "_paged_fallback_attn", "sdpa")
    fallback = ALL_ATTENTION_FUNCTIONS.get(fallback_name, sdpa_attention_forward)
    return fallback(module, query, key, value, attention_mask, **kwargs)


class _Extras:
    """What a layer's call adds to plain scaled-dot-product attention."""

    __slots__ = ("softcap", "sinks", "key_bias")

    def __init__(self, softcap, sinks, key_bias: KeyBias | None = None) -> None:
        self.softcap = softcap
        self.sinks = sinks
        self.key_bias = key_bias

    @property
    def any(self) -> bool:
        return self.softcap is not None or self.sinks is not None


PLAIN = _Extras(None, None)  # a layer's call that adds nothing to scaled-dot-product attention


def _attend(query, key, value, mask, scaling, extras: _Extras, is_causal=False):
    if extras.any:
        return _explicit_attention(query, key, value, mask, scaling, extras, is_causal)
    # enable_gqa lets SDPA broadcast kv heads without materialising repeat_kv copies.
    gqa = query.shape[1] != key.shape[1]
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, is_causal=is_causal and mask is None, enable_gqa=gqa
    )


def _explicit_attention(query, key, value, mask, scaling, extras: _Extras, is_causal):
    """Soft-capped logits (Gemma 2) and attention sinks (gpt-oss), in the order of the models'
    own eager attention: SDPA has neither."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
    weights = torch.matmul(query, key.transpose(-1, -2)) * scale
    if extras.softcap is not None:
        weights = torch.tanh(weights / extras.softcap) * extras.softcap
    if mask is None and is_causal:
        q_len, k_len = weights.shape[-2:]
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=weights.device).tril(k_len - q_len)
    if mask is not None:
        weights = weights.masked_fill(~mask, torch.finfo(weights.dtype).min)
    if extras.sinks is not None:
        sinks = extras.sinks.reshape(1, -1, 1, 1).to(weights.dtype).expand(*weights.shape[:-1], 1)
        combined = torch.cat([weights, sinks], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
    else:
        probs = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs.to(value.dtype), value)


def _temperature_correction(module, query: torch.Tensor, layout: PagedLayout) -> torch.Tensor:
    """Llama 4's NoPE layers scale queries by a function of position, which they compute from the
    index in the forward's input: in a packed step that is not the token's position. Replace
    the scale computed from the index by the one of the real position."""

    def scale(positions: torch.Tensor) -> torch.Tensor:
        return (
            torch.log1p(torch.floor((positions.float() + 1.0) / module.floor_scale)) * module.attn_scale + 1.0
        )

    length = query.shape[2]
    correction = scale(layout.positions) / scale(torch.arange(length, device=query.device))
    return (query * correction.view(1, 1, length, 1)).to(query.dtype)


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    layout = current_layout()
    layer_idx = getattr(module, "layer_idx", None)
    if layout is None or layer_idx is None:
        return _fallback(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if key.shape[2] != query.shape[2]:
        raise FastPathUnsupported("cross-attention")
    if not getattr(module, "is_causal", True) and not layout.declared_spans:
        raise FastPathUnsupported("non-causal attention")
    layout = layout.on(query.device)
    extras = _Extras(kwargs.get("softcap"), kwargs.get("s_aux"), kwargs.get("key_bias"))
    if extras.key_bias is not None and extras.any:
        raise FastPathUnsupported("a key bias with soft-capping or sinks")
    rule = layout.rules.get(layer_idx, FULL)
    if kwargs.get("sliding_window") is not None:
        rule = LayerRule(window=int(kwargs["sliding_window"]), chunk=rule.chunk)
    tuned = getattr(module, "attn_temperature_tuning", False) and not getattr(module, "use_rope", True)
    if tuned:
        query = _temperature_correction(module, query, layout)
    if layout.observed is not None:
        plain = not (extras.any or extras.key_bias is not None or tuned)
        layout.observed[layer_idx] = ObservedCall(rule, scaling, plain)

    # query: [1, H, T, D]; key/value: [1, Hkv, T, Dk/Dv]; pools: [blocks + 1, block_size, Hkv, D]
    key_pool, value_pool = layout.cache.layer(layer_idx, key, value)
    key_pool.view(-1, *key_pool.shape[2:]).index_copy_(0, layout.slot_mapping, key[0].transpose(0, 1))
    value_pool.view(-1, *value_pool.shape[2:]).index_copy_(0, layout.slot_mapping, value[0].transpose(0, 1))
    if layout.flash is not None:
        out = flash_varlen_attention(
            layout.flash, query, key_pool, value_pool, _flash_options(scaling, rule, extras)
        )
    elif layout.flash_decode is not None:
        out = flash_decode_attention(
            layout.flash_decode, query, key_pool, value_pool, _flash_options(scaling, rule, extras)
        )
    else:
        parts = []
        if layout.num_decode:
            parts.append(decode_attention(layout, key_pool, value_pool, query, scaling, rule, extras))
        if layout.segments:
            parts.append(
                _prefill_attention(layout, key_pool, value_pool, query, key, value, scaling, rule, extras)
            )
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)  # [1, H, T, Dv]
    return out.transpose(1, 2).contiguous(), None


def gather(pool: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """`blocks` [..., nb] -> [..., Hkv, nb * block_size, D]: whole blocks copied at once
    (index_select along the block dimension copies about twice as fast on CPU as indexing)."""
    gathered = pool.index_select(0, blocks.flatten())  # [(...) * nb, block_size, Hkv, D]
    gathered = gathered.view(*blocks.shape[:-1], blocks.shape[-1] * pool.shape[1], *pool.shape[2:])
    return gathered.transpose(-3, -2)


def decode_attention(layout: PagedLayout, key_pool, value_pool, query, scaling, rule, extras):
    """The step's decode rows: [1, H, decode rows, Dv], through the compiled kernel over the pool
    where it applies, else gathered blocks and SDPA."""
    nd = layout.num_decode
    if (
        layout.in_place_decode
        and not extras.any
        and extras.key_bias is None
        and cpu_attention.usable(query, key_pool, value_pool)
    ):
        return cpu_attention.decode_attention(layout, key_pool, value_pool, query, scaling, rule)
    q = query[0, :, :nd].transpose(0, 1).unsqueeze(2)  # [Bd, H, 1, D]
    block_size = layout.cache.block_size
    bias, dtype = extras.key_bias, query.dtype
    if len(layout.decode_groups) == 1:
        group = layout.decode_groups[0]
        out = _attend(
            q,
            gather(key_pool, group.blocks),
            gather(value_pool, group.blocks),
            group.mask(block_size, rule, bias, dtype),
            scaling,
            extras,
        )
    else:
        out = q.new_empty(*q.shape[:-1], value_pool.shape[-1])
        for group in layout.decode_groups:
            keys = gather(key_pool, group.blocks)  # [g, Hkv, L, D]
            values = gather(value_pool, group.blocks)
            out[group.rows] = _attend(
                q[group.rows], keys, values, group.mask(block_size, rule, bias, dtype), scaling, extras
            )
    return out.squeeze(2).transpose(0, 1).unsqueeze(0)  # [1, H, Bd, Dv]


def _prefill_attention(layout: PagedLayout, key_pool, value_pool, query, key, value, scaling, rule, extras):
    outs = []
    bias, dtype = extras.key_bias, query.dtype
    for index, seg in enumerate(layout.segments):
        span = slice(seg.start, seg.start + seg.length)
        q = query[:, :, span]
        if seg.blocks is None:
            # The chunk starts its sequence: it attends only to its own keys, no gather needed.
            plain = rule == FULL and not seg.spans and bias is None
            mask = None if plain else layout.segment_mask(index, rule, bias, dtype)
            outs.append(_attend(q, key[:, :, span], value[:, :, span], mask, scaling, extras, is_causal=True))
            continue
        keys = gather(key_pool, seg.blocks).unsqueeze(0)  # [1, Hkv, L, D]
        values = gather(value_pool, seg.blocks).unsqueeze(0)
        outs.append(_attend(q, keys, values, layout.segment_mask(index, rule, bias, dtype), scaling, extras))
    return torch.cat(outs, dim=2)


def _flash_options(scaling, rule: LayerRule, extras: _Extras) -> dict:
    """What both FlashAttention calls pass for the layer's rule: causal, its window, soft-capping."""
    if rule.chunk is not None or extras.sinks is not None or extras.key_bias is not None:
        # The runner keeps FlashAttention off for such models; reaching here is a bug, not a fallback.
        raise FastPathUnsupported("FlashAttention cannot apply attention chunks, sinks or key biases")
    return {
        "softmax_scale": scaling,
        "causal": True,
        "window_size": (rule.window - 1, 0) if rule.window is not None else (-1, -1),
        "softcap": extras.softcap or 0.0,
    }


def register() -> None:
    """Idempotent: the registry is process-wide, the function is stateless."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention)
