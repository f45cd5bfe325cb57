"""Decode attention on CPU that reads the paged KV pool in place: one compiled C function.

Without it, each decode step's attention copies every row's key and value blocks out of the pool
(`models.attention.gather`), builds a mask over the padded copy and runs SDPA on it, layer by
layer. Timed in place on the bench model (`bench.step_split`), that took 2-2.4 ms of a batch-1
step and 5-9 ms of a batch-16 step, a third of it the copy, for attention arithmetic that is a
small fraction of it. `csrc/paged_decode_attention.c` scores each row's keys where they lie, tile
by tile with an online softmax; each row is a task (a row of more than 512 keys several, one per
span of keys, their partial results merged in order, so one long context still uses every core)
on torch's own OpenMP threads (the library links the
`libgomp.so.1` torch has already loaded, so no second thread pool competes for the cores).
Runners switch it per model (`PagedRunner.in_place_decode`, which the self-test turns off for a
model it does not reproduce).

The source is compiled at first use (`models.native`). Without it, `kernel()` is None and attention
keeps the gather + SDPA path; the startup self-test compares the fast path, this kernel included,
with the model's own forward.
It covers plain causal attention, sliding windows and attention chunks over float32 pools;
soft-capping, sinks and key biases keep the SDPA path.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from models import native


@dataclass(frozen=True)
class Kernel:
    function: Callable[..., None]
    max_task_floats: int  # what one task may keep on its stack (queries, accumulators, a tile of scores)
    tile: int  # keys scored at once


@functools.cache
def kernel() -> Kernel | None:
    """The compiled kernel, or None where it cannot be built here (`models.native` logs why)."""
    library = native.library("paged_decode_attention", "gather + SDPA")
    if library is None:
        return None
    function = library.paged_decode_attention
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    function.argtypes = [
        pointer, i64, i64, pointer, pointer, pointer, i64, pointer, pointer, pointer,
        pointer, i64, i32, i32, i32, i32, i32, ctypes.c_float, i32,
    ]  # fmt: skip
    function.restype = ctypes.c_int
    limit = ctypes.c_int.in_dll(library, "paged_decode_attention_max_task_floats").value
    tile = ctypes.c_int.in_dll(library, "paged_decode_attention_tile").value
    return Kernel(function, limit, tile)


def usable(query: torch.Tensor, key_pool: torch.Tensor, value_pool: torch.Tensor) -> bool:
    compiled = kernel()
    if compiled is None or query.device.type != "cpu":
        return False
    if not (query.dtype == key_pool.dtype == value_pool.dtype == torch.float32):
        return False
    if not (key_pool.is_contiguous() and value_pool.is_contiguous()) or query.stride(-1) != 1:
        return False
    heads, kv_heads = query.shape[1], key_pool.shape[2]
    if heads % kv_heads:
        return False
    group = heads // kv_heads
    return group * (query.shape[-1] + value_pool.shape[-1] + compiled.tile) <= compiled.max_task_floats


def decode_attention(layout, key_pool, value_pool, query, scaling, rule) -> torch.Tensor:
    """The decode rows of a step's `layout` (`models.attention.PagedLayout`) through the kernel:
    [1, heads, decode rows, dim_v], each row over its keys in the pool from where the layer's
    `rule` lets it start up to its own position."""
    out = query.new_empty(layout.num_decode, query.shape[1], value_pool.shape[-1])
    scale = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
    for group in layout.decode_groups:
        first, length = group.key_range(rule)
        blocks = group.blocks if group.blocks.stride(-1) == 1 else group.blocks.contiguous()
        attend(query, key_pool, value_pool, blocks, first, length, group.rows, out, scale)
    return out.transpose(0, 1).unsqueeze(0)


def attend(
    query: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    blocks: torch.Tensor,
    first: torch.Tensor,
    length: torch.Tensor,
    rows: torch.Tensor | None,
    out: torch.Tensor,
    scale: float,
) -> None:
    """Writes into `out` [decode rows, heads, dim_v] the attention of decode rows `rows` (all of
    them, in order, when None) of `query` [1, heads, T, dim] over positions `first` to `length`
    - 1 of each row's `blocks` [rows, width] (long, contiguous, like `first` and `length`)."""
    failed = kernel().function(
        query.data_ptr(),
        query.stride(2),
        query.stride(1),
        key_pool.data_ptr(),
        value_pool.data_ptr(),
        blocks.data_ptr(),
        blocks.stride(0),
        first.data_ptr(),
        length.data_ptr(),
        None if rows is None else rows.data_ptr(),
        out.data_ptr(),
        blocks.shape[0],
        query.shape[1],
        key_pool.shape[2],
        query.shape[3],
        value_pool.shape[3],
        key_pool.shape[1],
        float(scale),
        torch.get_num_threads(),
    )
    if failed:
        raise MemoryError("decode attention: no memory for the partial results of long rows")
