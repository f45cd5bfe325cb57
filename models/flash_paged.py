"""FlashAttention 2 over the paged KV pool (GPU, fp16/bf16, `flash_attn` installed): the step's
metadata and the two calls `models.attention` makes, given the options its layer rule maps to.
Its paged kernels need blocks of a multiple of 256 tokens."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

FLASH_BLOCK_MULTIPLE = 256


def flash_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and importlib.util.find_spec("flash_attn") is not None
    )


@dataclass(slots=True)
class FlashMetadata:
    cu_seqlens_q: torch.Tensor  # [rows + 1] int32
    cu_seqlens_k: torch.Tensor  # [rows + 1] int32
    max_seqlen_q: int
    max_seqlen_k: int
    block_table: torch.Tensor  # [rows, max_blocks] int32


@dataclass(slots=True)
class FlashDecode:
    """A decode-only step on static buffers (`models.graphs`): FlashAttention reads each row's
    blocks itself up to its length, so the tensors keep one shape whatever the lengths."""

    seq_lens: torch.Tensor  # [rows] int32: keys each row attends to, itself included
    block_table: torch.Tensor  # [rows, width] int32


def flash_varlen_attention(meta: FlashMetadata, query, key_pool, value_pool, options: dict) -> torch.Tensor:
    """Every row of a step (prefill chunks and decode rows) in one varlen call over the pool."""
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
        block_table=meta.block_table,
        **options,
    )  # [T, H, D]
    return out.transpose(0, 1).unsqueeze(0)  # [1, H, T, D]


def flash_decode_attention(meta: FlashDecode, query, key_pool, value_pool, options: dict) -> torch.Tensor:
    """A decode-only step on static buffers: one row per sequence, lengths read on the device."""
    from flash_attn import flash_attn_with_kvcache

    q = query[0].transpose(0, 1).unsqueeze(1)  # [B, 1, H, D]
    out = flash_attn_with_kvcache(
        q,
        key_pool,
        value_pool,
        cache_seqlens=meta.seq_lens,
        block_table=meta.block_table,
        **options,
    )  # [B, 1, H, D]
    return out.squeeze(1).transpose(0, 1).unsqueeze(0)  # [1, H, B, D]
