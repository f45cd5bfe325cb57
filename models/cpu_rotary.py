"""Rotary position embedding of float32 CPU replicas as one compiled call (`csrc/rotary_embedding.c`).

transformers' `apply_rotary_pos_emb` is sixteen small torch ops per attention layer (two
unsqueezes, and for each of the query and key: two slices, a negation, a concatenation, two
products and a sum), each with its dispatch: about 22 us per call at batch 1 against 10 for the
compiled call (docs/BENCHMARKS.md, "Host work around the kernels"). The
attention modules look the function up in their modeling module's namespace at every call, so
that name is what gets replaced, with a function that runs the kernel for the calls it was checked
for and the module's own function for any other.

The replacement is decided by behaviour: the modeling module's function is run on random query,
key, cos and sin tensors and the kernel is installed only where it answers the same, bit for bit
(the kernel rounds each product and the sum as torch does), with features paired as halves
(Llama's `rotate_half`) or as neighbours (GPT-J's, Cohere's); rotating part of the features
(Phi-3's partial rotary) is used only if that case answered the same too. Calls of another shape,
dtype or device, or with other arguments, go to the original function.

The name is replaced in the modeling module, so for the whole process: every model of that
architecture gets the kernel, which answers as the function it replaces.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable

import torch
from torch import nn

from models import native

_CPU = torch.device("cpu")

_NAME = "apply_rotary_pos_emb"


def _library():
    # Contracting (x * cos) + (partner * sin) into a fused multiply-add would round once where
    # torch rounds three times: off, so that the kernel's answers are the function's, bit for bit.
    return native.library("rotary_embedding", "torch's rotary ops", flags=("-ffp-contract=off",))


def _bound(name: str, argtypes: list) -> Callable[..., None] | None:
    library = _library()
    if library is None:
        return None
    function = getattr(library, name)
    function.argtypes = argtypes
    function.restype = None
    return function


_POINTER, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@functools.cache
def kernel() -> Callable[..., None] | None:
    return _bound("rotary_embedding", [
        _POINTER, _I64, _I64, _I64, _I64, _POINTER, _I64, _I64, _I64, _I64, _POINTER, _POINTER,
        _I64, _I64, _I64, _I64, _I64, _I64, _INT, _POINTER, _POINTER,
    ])  # fmt: skip


@functools.cache
def pool_kernel() -> Callable[..., None] | None:
    return _bound("rotary_embedding_into_pool", [
        _POINTER, _I64, _I64, _I64, _POINTER, _I64, _I64, _I64, _POINTER, _I64, _I64, _POINTER, _POINTER,
        _I64, _I64, _I64, _I64, _I64, _INT, _POINTER, _POINTER, _POINTER, _POINTER,
    ])  # fmt: skip


def _fits(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """The calls the kernel takes: [B, H, T, D] heads, [B, T, R] angles, float32 on CPU, unit
    stride along the features, cos and sin laid out alike. (Ordered cheapest first: it runs
    at every attention layer of every step.)"""
    f32 = torch.float32
    if q.dtype is not f32 or k.dtype is not f32 or cos.dtype is not f32 or sin.dtype is not f32:
        return False
    if not (q.is_cpu and k.is_cpu and cos.is_cpu and sin.is_cpu) or q.dim() != 4 or k.dim() != 4:
        return False
    batch, _, tokens, dim = q.shape
    angles = cos.shape
    return (
        len(angles) == 3
        and sin.shape == angles
        and angles[0] == batch
        and angles[1] == tokens
        and 0 < angles[2] <= dim
        and angles[2] % 2 == 0
        and k.shape[0] == batch
        and k.shape[2] == tokens
        and k.shape[3] == dim
        and cos.stride() == sin.stride()
        and cos.stride(2) == 1
        and q.stride(3) == 1
        and k.stride(3) == 1
    )


def rotate(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k rotated (a call `_fits` accepts): new tensors of their shapes, laid out [B, T, H, D]."""
    batch, q_heads, tokens, dim = q.shape
    k_heads = k.shape[1]
    # Explicit: a process may have changed torch's default dtype or device.
    q_out = torch.empty(batch, tokens, q_heads, dim, dtype=torch.float32, device=_CPU)
    k_out = torch.empty(batch, tokens, k_heads, dim, dtype=torch.float32, device=_CPU)
    if batch and tokens and dim:
        q_strides, k_strides, angle_strides = q.stride(), k.stride(), cos.stride()
        kernel()(
            q.data_ptr(), q_strides[0], q_strides[1], q_strides[2], q_heads,
            k.data_ptr(), k_strides[0], k_strides[1], k_strides[2], k_heads,
            cos.data_ptr(), sin.data_ptr(), angle_strides[0], angle_strides[1],
            batch, tokens, dim, cos.shape[2], interleaved, q_out.data_ptr(), k_out.data_ptr(),
        )  # fmt: skip
    return q_out.transpose(1, 2), k_out.transpose(1, 2)


class FusedRotary:
    """Stands in for a modeling module's `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`."""

    def __init__(self, original: Callable, interleaved: bool, partial: bool) -> None:
        self.original = original
        self.interleaved = interleaved
        self.partial = partial
        self._flag = int(interleaved)
        functools.update_wrapper(self, original)

    def __call__(self, q, k, cos, sin, *args, **kwargs):
        if (
            ((args or kwargs) and not _default_unsqueeze(args, kwargs))
            or not _fits(q, k, cos, sin)
            or (cos.shape[2] != q.shape[3] and not self.partial)
        ):
            return self.original(q, k, cos, sin, *args, **kwargs)
        return rotate(q, k, cos, sin, self._flag)

    def into_pool(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_pool: torch.Tensor,
        value_pool: torch.Tensor,
        slots: torch.Tensor,
    ) -> torch.Tensor | None:
        """For one sequence dimension: q [1, Hq, T, D] rotated (returned so, laid out [1, T, Hq,
        D]), k [1, Hk, T, D] rotated and v [T, Hk, Dv] copied into the rows `slots` [T] (long) of
        the pools [.., block_size, Hk, D or Dv], in one call: what this function and two
        `index_copy_` compute, bit for bit. None for a call it does not take."""
        if not (_fits(q, k, cos, sin) and q.shape[0] == 1 and (cos.shape[2] == q.shape[3] or self.partial)):
            return None
        tokens, k_heads, dim = q.shape[2], k.shape[1], q.shape[3]
        value_dim = v.shape[-1]
        if not (
            v.dtype is torch.float32
            and v.is_cpu
            and v.dim() == 3
            and v.shape[0] == tokens
            and v.shape[1] == k_heads
            and v.stride(2) == 1
            and key_pool.dtype is torch.float32
            and value_pool.dtype is torch.float32
            and key_pool.is_contiguous()
            and value_pool.is_contiguous()
            and key_pool.shape[-2:] == (k_heads, dim)
            and value_pool.shape[-2:] == (k_heads, value_dim)
            and slots.dtype is torch.long
            and slots.is_contiguous()
            and slots.shape == (tokens,)
        ):
            return None
        q_out = torch.empty(1, tokens, q.shape[1], dim, dtype=torch.float32, device=_CPU)
        if tokens and dim:
            q_strides, k_strides, v_strides = q.stride(), k.stride(), v.stride()
            pool_kernel()(
                q.data_ptr(), q_strides[1], q_strides[2], q.shape[1],
                k.data_ptr(), k_strides[1], k_strides[2], k_heads,
                v.data_ptr(), v_strides[0], v_strides[1],
                cos.data_ptr(), sin.data_ptr(), cos.stride(1),
                tokens, dim, cos.shape[2], value_dim, self._flag,
                q_out.data_ptr(), key_pool.data_ptr(), value_pool.data_ptr(), slots.data_ptr(),
            )  # fmt: skip
        return q_out.transpose(1, 2)


def _default_unsqueeze(args: tuple, kwargs: dict) -> bool:
    """Whether the arguments after (q, k, cos, sin) only say `unsqueeze_dim=1`, the default."""
    if len(args) + len(kwargs) != 1:
        return False
    return (args[0] if args else kwargs.get("unsqueeze_dim")) == 1


def _probe(rotated: int, dim: int = 16) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(rotated)
    q = torch.randn(1, 5, 3, dim, generator=generator).transpose(1, 2)  # [B, H, T, D] as projections give it
    k = torch.randn(1, 5, 2, dim, generator=generator).transpose(1, 2)
    cos = torch.randn(1, 5, rotated, generator=generator)
    sin = torch.randn(1, 5, rotated, generator=generator)
    return q, k, cos, sin


def _answers_alike(original: Callable, interleaved: bool, rotated: int) -> bool:
    q, k, cos, sin = _probe(rotated)
    try:
        with torch.inference_mode():
            expected = original(q, k, cos, sin)
    except Exception:  # noqa: BLE001 - a function of another signature or shape rule is not ours
        return False
    if not (isinstance(expected, tuple) and len(expected) == 2):
        return False
    with torch.inference_mode():
        actual = rotate(q, k, cos, sin, int(interleaved))
    return all(
        isinstance(want, torch.Tensor) and want.shape == got.shape and torch.equal(want, got)
        for want, got in zip(expected, actual, strict=True)
    )


def _replacement(original: Callable) -> FusedRotary | None:
    for interleaved in (False, True):
        if _answers_alike(original, interleaved, rotated=16):
            return FusedRotary(
                original, interleaved, partial=_answers_alike(original, interleaved, rotated=8)
            )
    return None


def fuse_rotary(model: nn.Module) -> str:
    """Put the kernel in place of `apply_rotary_pos_emb` in the modeling modules of `model`'s
    layers where it answers as that function; returns a one-line decision for the log."""
    if kernel() is None:
        return "fused CPU rotary embedding: off (kernel not built here)"
    modules = {type(module).__module__ for module in model.modules()}
    namespaces = [
        sys.modules[name] for name in sorted(modules) if callable(getattr(sys.modules.get(name), _NAME, None))
    ]
    if not namespaces:
        return "fused CPU rotary embedding: off (no apply_rotary_pos_emb in the model's code)"
    fused = []
    for namespace in namespaces:
        function = getattr(namespace, _NAME)
        if not isinstance(function, FusedRotary):
            replacement = _replacement(function)
            if replacement is None:
                continue
            setattr(namespace, _NAME, replacement)
        fused.append(namespace.__name__.rpartition(".")[2])
    if not fused:
        return f"fused CPU rotary embedding: off (the model's {_NAME} is not one it reproduces)"
    return f"fused CPU rotary embedding: on ({', '.join(fused)})"
