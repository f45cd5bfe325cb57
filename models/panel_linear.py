"""float32 CPU linears through one compiled C function over weights stored as panels.

A decode step on CPU is its linear layers reading their weights: at batch 1 each weight is read
once per token and the step is as fast as memory streams them; at batch 16-32 every weight also
meets each row in one FMA. oneDNN's packed call (`models.cpu_kernels`' other backend) reached
19-20 GB/s at batch 1 on this project's CI machine, where a plain AVX-512 read of the same 327 MB
runs at 25-26. `csrc/panel_linear.c` stores each layer's weight as panels of 16 output features
(`[ceil(out / 16), in, 16]`, padded with zeros), so one 64-byte load holds 16 outputs' weights for
one input feature and each input row meets it in one broadcast FMA; measured one layer at a time
against oneDNN's packed call with the weights coming from memory (`bench.linears`,
docs/BENCHMARKS.md) it is faster at batch 1 and about even or faster from 8 rows up to 512.

Each output is one chain of FMAs over the inputs in order, plus the bias: a row's result does not
depend on which rows share its call, so batching keeps greedy outputs bit-identical.

The panels live in memory advised for transparent huge pages (2 MiB), where the kernel allows
it: streamed front to back every step, 4 KiB pages cost a TLB miss each 4 KiB.

The kernel needs AVX-512F and a C compiler (`models.native`); without them `available()` is
False and the layers keep oneDNN's packed call.
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
from collections.abc import Callable

import torch

from models import native

_CPU = torch.device("cpu")
_HUGE_PAGE = 2 << 20


def _library():
    return native.library("panel_linear", "oneDNN packed linears", needs=("avx512f",))


@functools.cache
def kernel() -> Callable[..., None] | None:
    library = _library()
    if library is None:
        return None
    function = library.panel_linear
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer, i64, i64, i64, pointer, i64, pointer, pointer, i64, ctypes.c_int]
    function.restype = None
    return function


def available() -> bool:
    return kernel() is not None


def _lanes() -> int:
    return ctypes.c_int.in_dll(_library(), "panel_linear_lanes").value


def to_panels(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] -> [ceil(out / lanes), in, lanes], the features past `out` zero."""
    lanes = _lanes()
    out_features, in_features = weight.shape
    padded = weight.new_zeros(-(-out_features // lanes) * lanes, in_features)
    padded[:out_features] = weight
    panels = padded.view(-1, lanes, in_features).transpose(1, 2)
    return _on_huge_pages(panels.shape).copy_(panels)


def _on_huge_pages(shape: torch.Size) -> torch.Tensor:
    """An uninitialised float32 tensor whose 2 MiB-aligned stretches are advised for transparent
    huge pages before anything touches them (the advice only shapes pages faulted in after it;
    with THP `madvise`, the common default, nothing else gets them). Small tensors, and systems
    that refuse the advice, get ordinary memory."""
    nbytes = math.prod(shape) * 4
    if nbytes < _HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE") or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty(shape, dtype=torch.float32)
    # Private: shared anonymous memory is shmem, whose huge pages are a separate switch (off by default).
    region = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive with the tensor
    offset = -whole.data_ptr() % _HUGE_PAGE
    try:
        region.madvise(mmap.MADV_HUGEPAGE, offset, nbytes)
    except OSError:
        pass  # THP off or unsupported: ordinary pages, same values
    return whole[offset : offset + nbytes].view(torch.float32).view(shape)


class PanelProduct:
    """`x @ weight.T + bias` through the panel kernel, for float32 CPU inputs (as oneDNN's packed
    call, which it replaces, it keeps no unpacked weight to serve others)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.bias = None if bias is None else bias.detach().contiguous()
        self.out_features, self.in_features = weight.shape
        self.panels = to_panels(weight.detach())
        self._function = kernel()
        # Both tensors belong to this product and are never replaced: their addresses hold.
        self._panels_address = self.panels.data_ptr()
        self._bias_address = None if self.bias is None else self.bias.data_ptr()

    def agrees_with(self, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """Whether this product answers as F.linear over `weight` on random rows through both tile
        shapes (up to 4 rows, then 8 with a tail). The replica's self-test cannot tell: once
        packed, the model's own forward, its reference, runs the same product."""
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(9, self.in_features, generator=generator)
        with torch.inference_mode():
            expected = torch.nn.functional.linear(x, weight, bias)
            actual = torch.cat([self(x[:1]), self(x[1:])])
        return bool(
            torch.allclose(actual, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()) + 1e-6)
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Kept lean: it runs for every linear layer of every step (several us of Python per call
        # were a visible share of a batch-1 CPU step).
        if x.dtype is not torch.float32 or not x.is_cpu:
            raise TypeError(f"the panel kernel takes float32 CPU inputs, not {x.dtype} on {x.device}")
        in_features, out_features = self.in_features, self.out_features
        if x.is_contiguous():
            rows, row_stride = x, in_features
        else:
            rows = x.reshape(-1, in_features)
            if rows.stride(-1) != 1 or rows.stride(0) < in_features:
                rows = rows.contiguous()
            row_stride = rows.stride(0)
        count = rows.numel() // in_features if in_features else 0
        out = torch.empty((*x.shape[:-1], out_features), dtype=torch.float32, device=_CPU)
        if count:
            self._function(
                rows.data_ptr(),
                count,
                in_features,
                row_stride,
                self._panels_address,
                out_features,
                self._bias_address,
                out.data_ptr(),
                out_features,
                torch.get_num_threads(),
            )
        return out
