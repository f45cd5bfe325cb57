"""The generic path's batching: decode forwards of several `generate()` calls computed as one.

Each call comes with its own `DynamicCache`. They are merged the way `generate()` batches prompts
of different lengths: every cache left-padded to the longest, the padding masked out by the 2-D
attention mask, each row at its own position. After the forward, each sequence's cache gets its
own rows back (the new token's keys and values included) and its logits row, so `generate()`
continues as if it had run the forward alone.

Hybrid models (Mamba-2, Gated DeltaNet, short-convolution layers beside attention: Qwen3.5,
Qwen3-Next, Granite 4, Jamba, Bamba, LFM2) keep a fixed-size state per sequence in their linear
layers instead of keys and values: those states are stacked row by row and given back the same
way, no padding needed (a state already summarises its sequence's whole past).

Only calls whose inputs are all understood are merged: one new token, a cache of plain dynamic
and linear-attention layers, nothing but ids, masks, positions and token types among the tensors.
Anything else (cross-attention masks, sliding-window cache layers) is computed one call at a time,
as is a call of a model with per-sequence module state (Qwen-VL's rope_deltas) that does not
carry its own positions (`GenericRunner._may_merge`). `batching_problem` checks at startup that
merged decoding reproduces single decoding.
"""

from __future__ import annotations

import copy
import inspect
import logging

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, LinearAttentionAndFullAttentionLayer, LinearAttentionLayer

log = logging.getLogger(__name__)

# Inputs with the new token's own entry (Qwen-VL's token types), stacked like the ids.
_PER_ROW = ("mm_token_type_ids",)
_UNDERSTOOD = {
    "input_ids",
    "attention_mask",
    "position_ids",
    "cache_position",
    "past_key_values",
    "use_cache",
    "return_dict",
    "logits_to_keep",
    "output_attentions",
    "output_hidden_states",
    "inputs_embeds",
    *_PER_ROW,
}


def accepts_positions(forward) -> bool:
    try:
        return "position_ids" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


# Cache layers merged decoding understands (exact types: a subclass may keep more state).
_LAYER_TYPES = (DynamicLayer, LinearAttentionLayer, LinearAttentionAndFullAttentionLayer)


def _length(kwargs: dict) -> int:
    return kwargs["past_key_values"].get_seq_length()


def _keys_filled(layer) -> bool:
    return isinstance(layer, DynamicLayer) and layer.is_initialized


def _states(layer) -> tuple:
    """Which recurrent states a linear layer holds, and whether it has seen its prompt: calls
    share a forward only when these agree."""
    if not isinstance(layer, LinearAttentionLayer):
        return ()
    return tuple(
        (
            layer.is_conv_states_initialized[i],
            layer.is_recurrent_states_initialized[i],
            layer.has_previous_state[i],
        )
        for i in layer.conv_states
    )


def mergeable(kwargs: dict) -> bool:
    ids = kwargs.get("input_ids")
    if (
        not isinstance(ids, torch.Tensor)
        or tuple(ids.shape) != (1, 1)
        or kwargs.get("inputs_embeds") is not None
    ):
        return False
    cache = kwargs.get("past_key_values")
    if type(cache) is not DynamicCache or any(type(layer) not in _LAYER_TYPES for layer in cache.layers):
        return False
    # The sequence's length is read from its first attention layer, which must hold it.
    first = next((layer for layer in cache.layers if isinstance(layer, DynamicLayer)), None)
    if first is None or not first.is_initialized:
        return False
    # Layers a forward never filled (Mllama's cross-attention ones, for a text prompt) stay empty;
    # every filled one must hold the sequence's own tokens, every state its one row.
    length = cache.get_seq_length()
    if any(_keys_filled(layer) and layer.keys.shape[-2] != length for layer in cache.layers):
        return False
    states = [
        state
        for layer in cache.layers
        if isinstance(layer, LinearAttentionLayer)
        for state in (*layer.conv_states.values(), *layer.recurrent_states.values())
    ]
    if any(state is not None and state.shape[0] != 1 for state in states):
        return False
    mask = kwargs.get("attention_mask")
    if mask is not None and (mask.dim() != 2 or mask.shape[-1] != length + 1 or not bool(mask.all())):
        return False
    if any(isinstance(kwargs.get(name), torch.Tensor) and kwargs[name].shape != (1, 1) for name in _PER_ROW):
        return False
    return not any(name not in _UNDERSTOOD and isinstance(v, torch.Tensor) for name, v in kwargs.items())


def _signature(kwargs: dict, with_positions: bool) -> tuple:
    """Calls with the same signature can share a forward."""
    fixed = tuple(
        sorted(
            (name, repr(v)) for name, v in kwargs.items() if not isinstance(v, torch.Tensor | DynamicCache)
        )
    )
    positions = kwargs.get("position_ids")
    shape = None if positions is None else positions.dim()
    cache = kwargs["past_key_values"]
    # Without a way to give each row its position, only equal lengths can share a forward.
    length = None if with_positions else cache.get_seq_length()
    filled = tuple((_keys_filled(layer), _states(layer)) for layer in cache.layers)
    return (tuple(sorted(kwargs)), fixed, shape, filled, length)


def groups(calls: list[dict], with_positions: bool) -> list[list[int]]:
    """Indices of `calls` that can be merged, grouped; calls that cannot are groups of one."""
    by_signature: dict[tuple, list[int]] = {}
    out: list[list[int]] = []
    for index, kwargs in enumerate(calls):
        if not mergeable(kwargs):
            out.append([index])
            continue
        by_signature.setdefault(_signature(kwargs, with_positions), []).append(index)
    out.extend(by_signature.values())
    return out


def run_merged(forward, calls: list[dict], *, with_positions: bool) -> list:
    """One forward for `calls` (all `mergeable`, one group); one output per call, each holding
    that call's own cache with the new token's keys and values appended."""
    lengths = [_length(c) for c in calls]
    longest = max(lengths)
    first = calls[0]
    device = first["input_ids"].device
    merged = copy.copy(first["past_key_values"])
    merged.layers = [
        _merged_layer(template, [c["past_key_values"].layers[index] for c in calls], lengths, longest)
        for index, template in enumerate(first["past_key_values"].layers)
    ]
    mask = torch.zeros(len(calls), longest + 1, dtype=torch.long, device=device)
    for row, n in enumerate(lengths):
        mask[row, longest - n :] = 1
    kwargs = dict(first)
    kwargs["input_ids"] = torch.cat([c["input_ids"] for c in calls])
    for name in _PER_ROW:
        if isinstance(first.get(name), torch.Tensor):
            kwargs[name] = torch.cat([c[name] for c in calls])
    kwargs["attention_mask"] = mask
    kwargs["past_key_values"] = merged
    if "cache_position" in kwargs:
        kwargs["cache_position"] = torch.tensor([longest], dtype=torch.long, device=device)
    if first.get("position_ids") is not None:
        batch_dim = first["position_ids"].dim() - 2
        kwargs["position_ids"] = torch.cat([c["position_ids"] for c in calls], dim=batch_dim)
    elif with_positions:
        kwargs["position_ids"] = torch.tensor([[n] for n in lengths], dtype=torch.long, device=device)
    out = forward(**kwargs)
    results = []
    for row, (call, n) in enumerate(zip(calls, lengths, strict=True)):
        own = call["past_key_values"]
        for layer, big in zip(own.layers, merged.layers, strict=True):
            _take_row(layer, big, row, longest - n)
        results.append(type(out)(logits=out.logits[row : row + 1], past_key_values=own))
    return results


def _merged_layer(template, layers: list, lengths: list[int], longest: int):
    """One layer of the merged cache: keys and values left-padded to the longest sequence and
    stacked, recurrent states stacked. New tensors and dicts: the forward updates them in place."""
    merged = copy.copy(template)
    if _keys_filled(template):
        merged.keys = torch.cat(
            [F.pad(ly.keys, (0, 0, longest - n, 0)) for ly, n in zip(layers, lengths, strict=True)]
        )
        merged.values = torch.cat(
            [F.pad(ly.values, (0, 0, longest - n, 0)) for ly, n in zip(layers, lengths, strict=True)]
        )
    if isinstance(template, LinearAttentionLayer):
        merged.conv_states = {
            i: torch.cat([ly.conv_states[i] for ly in layers]) if filled else None
            for i, filled in template.is_conv_states_initialized.items()
        }
        merged.recurrent_states = {
            i: torch.cat([ly.recurrent_states[i] for ly in layers]) if filled else None
            for i, filled in template.is_recurrent_states_initialized.items()
        }
        for name in ("is_conv_states_initialized", "is_recurrent_states_initialized", "has_previous_state"):
            setattr(merged, name, dict(getattr(template, name)))
        merged.conv_kernel_size = dict(template.conv_kernel_size)
    return merged


def _take_row(layer, big, row: int, padding: int) -> None:
    """Give a sequence's layer its own row of the merged one (the new token's part included)."""
    if isinstance(big, DynamicLayer) and big.is_initialized:
        layer.keys = big.keys[row : row + 1, :, padding:].clone()
        layer.values = big.values[row : row + 1, :, padding:].clone()
    if isinstance(big, LinearAttentionLayer):
        for i, state in big.conv_states.items():
            if state is not None:
                layer.conv_states[i] = state[row : row + 1].clone()
        for i, state in big.recurrent_states.items():
            if state is not None:
                layer.recurrent_states[i] = state[row : row + 1].clone()
        for name in ("is_conv_states_initialized", "is_recurrent_states_initialized", "has_previous_state"):
            getattr(layer, name).update(getattr(big, name))
        layer.conv_kernel_size.update(big.conv_kernel_size)


def batching_problem(model, forward, token_ids: list[int]) -> str | None:
    """Why decode calls of this model cannot be merged, or None: two prompts of different
    lengths prefilled with the model's own cache, then one token each, alone and merged."""
    device = next(model.parameters()).device
    with_positions = accepts_positions(forward)
    calls, expected = [], []
    try:
        for length in (len(token_ids), max(2, len(token_ids) // 2)):
            ids = torch.tensor([token_ids[:length]], device=device)
            prefill = forward(input_ids=ids, use_cache=True, return_dict=True)
            cache = prefill.past_key_values
            call = {
                "input_ids": torch.tensor([[token_ids[0]]], device=device),
                "attention_mask": torch.ones(1, length + 1, dtype=torch.long, device=device),
                "past_key_values": cache,
                "use_cache": True,
                "return_dict": True,
            }
            if with_positions:
                call["position_ids"] = torch.tensor([[length]], device=device)
            if not mergeable(call):
                return f"its cache is not one merged decoding understands ({type(cache).__name__})"
            alone = dict(call, past_key_values=copy.deepcopy(cache))
            expected.append(forward(**alone).logits[0, -1].float())
            calls.append(call)
        if len(groups(calls, with_positions)) != 1:
            return "its forward takes no position ids: sequences of different lengths cannot share one"
        merged = run_merged(forward, calls, with_positions=with_positions)
    except Exception as exc:
        log.debug("merged decoding raised", exc_info=True)
        return f"merged decoding raised {type(exc).__name__}: {exc}"
    actual = torch.stack([out.logits[0, -1].float() for out in merged])
    reference = torch.stack(expected)
    scale = reference.abs().max().clamp(min=1.0)
    err = float((reference - actual).abs().max() / scale)
    tolerance = (
        1e-4 if reference.dtype == torch.float32 and next(model.parameters()).dtype == torch.float32 else 2e-2
    )
    if err > tolerance:
        return f"merged decoding differs from single decoding (relative error {err:.2e})"
    return None
