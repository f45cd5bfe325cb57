"""Falcon on the fast path: an attention forward of ours for transformers' `FalconAttention`.

Falcon's attention calls SDPA itself, with its own cache, instead of going through transformers'
AttentionInterface, so the paged attention registered there never runs for it. `install` gives
each of its attention modules a forward that computes queries, keys and values exactly as
`FalconAttention.forward` does and then calls `paged_attention`, as every other architecture's
attention does through the interface. Outside a packed step (the self-test's reference forward,
`generate()` in tests, the generic path) the module runs transformers' own forward.

The three layouts of the fused `query_key_value` projection:

- `new_decoder_architecture` (Falcon-40B/180B, Falcon 2): per KV group, its query heads then one
  key and one value head. Falcon broadcasts the group's key and value to every query head; the
  pool keeps one per group (`num_kv_heads`) and attention maps query head `h` to group
  `h // (heads / kv_heads)`, which is the head Falcon broadcast to it.
- `multi_query` (Falcon-7B): all query heads, then one key and one value head.
- plain multi-head (Falcon-RW): per head, its query, key and value.

Positions are rotary (`config.rotary`) or ALiBi (`config.alibi`, Falcon-RW). ALiBi is reproduced as
Falcon's SDPA path adds it, which is what its original code computed: to the scaled scores
`q.k / sqrt(head_dim)` it adds `alibi / sqrt(head_dim)`, where `alibi` is the head's slope times
the key's position in its sequence (not the query-key distance: per query that differs by a
constant, which softmax ignores, but not in rounding), multiplied in bfloat16 as
`build_alibi_tensor` does and then cast to the model's dtype. Falcon's eager path adds the bias
twice (once inside the scaled scores, once through its mask): an ALiBi model loaded with eager
attention fails the self-test, and the generic path serves what that eager code computes.
"""

from __future__ import annotations

import math
import types

import torch
from torch import nn
from transformers.models.falcon.modeling_falcon import (
    FalconAttention,
    apply_rotary_pos_emb,
    build_alibi_tensor,
)

from models.attention import current_layout, paged_attention


class AlibiBias:
    """Falcon's ALiBi as an additive bias over key positions, shared by every layer of a model."""

    def __init__(self, num_heads: int, head_dim: int) -> None:
        self.num_heads = num_heads
        self.head_dim = head_dim

    def __call__(self, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[heads, length]: the bias Falcon adds to the scaled scores of keys at positions
        `0..length-1`, whatever the query."""
        ones = torch.ones(1, length, dtype=torch.long, device=device)
        alibi = build_alibi_tensor(ones, self.num_heads, dtype)  # [heads, 1, length]
        # The same division, in the same dtype, as FalconModel.forward applies to its mask.
        return alibi.view(self.num_heads, length) / math.sqrt(self.head_dim)


def install(model: nn.Module) -> AlibiBias | None:
    """Give every Falcon attention module of `model` the paged forward (none: nothing to do).
    Returns the ALiBi bias the forwards add, None when they use rotary positions."""
    modules = [m for m in model.modules() if isinstance(m, FalconAttention)]
    if not modules:
        return None
    config = modules[0].config
    bias = AlibiBias(config.num_attention_heads, modules[0].head_dim) if config.alibi else None
    for module in modules:
        module.forward = types.MethodType(_paged_forward, module)
        module._paged_alibi = bias
    return bias


def uninstall(model: nn.Module) -> None:
    """Back to transformers' own forward (when the generic path takes over)."""
    for module in model.modules():
        if isinstance(module, FalconAttention) and "forward" in module.__dict__:
            del module.forward
            del module._paged_alibi


def split_heads(module: FalconAttention, fused: torch.Tensor):
    """`fused` [1, T, qkv] -> query [1, H, T, D], key and value [1, Hkv, T, D], in Falcon's head
    order: key and value heads are not repeated per query head."""
    batch, length, _ = fused.shape
    heads, head_dim = module.num_heads, module.head_dim
    if module.new_decoder_architecture:
        groups = module.num_heads // module.num_kv_heads
        qkv = fused.view(batch, length, module.num_kv_heads, groups + 2, head_dim)
        query = qkv[:, :, :, :-2].flatten(2, 3)
        key, value = qkv[:, :, :, -2], qkv[:, :, :, -1]
    elif not module.multi_query:
        qkv = fused.view(batch, length, heads, 3, head_dim)
        query, key, value = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    else:
        qkv = fused.view(batch, length, heads + 2, head_dim)
        query, key, value = qkv[:, :, :-2], qkv[:, :, -2:-1], qkv[:, :, -1:]
    return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)


def _paged_forward(
    self: FalconAttention,
    hidden_states: torch.Tensor,
    alibi: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.LongTensor | None = None,
    layer_past=None,
    use_cache: bool = False,
    output_attentions: bool = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs,
):
    if current_layout() is None:
        return type(self).forward(
            self,
            hidden_states,
            alibi,
            attention_mask,
            position_ids=position_ids,
            layer_past=layer_past,
            use_cache=use_cache,
            output_attentions=output_attentions,
            position_embeddings=position_embeddings,
            **kwargs,
        )
    # hidden_states: [1, T, hidden], the packed step
    query, key, value = split_heads(self, self.query_key_value(hidden_states))
    bias = self._paged_alibi
    if bias is None:
        cos, sin = position_embeddings  # [1, T, D], from each token's own position
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
    # The model's `alibi` counts positions from the start of the packed step: the paged attention
    # computes the bias from each key's position in its own sequence instead.
    out, _ = paged_attention(
        self, query, key, value, None, scaling=self.inv_norm_factor, key_bias=bias
    )  # [1, T, H, D]
    return self.dense(out.reshape(*hidden_states.shape[:2], self.num_heads * self.head_dim)), None
