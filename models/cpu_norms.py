"""RMSNorm layers of float32 CPU replicas through one compiled call each (`csrc/rms_norm.c`).

transformers' RMSNorm is eight small torch ops (cast, square, mean as a sum and a division, add,
rsqrt, two products), each with its dispatch: about 16 us per call at batch 1 against 7 for the
compiled call, for a few microseconds of arithmetic. A decoder runs two per layer plus the final
one (and Qwen3's or OLMo2's query and key norms): 25 per step on the 12-layer bench model
(docs/BENCHMARKS.md, "Host work around the kernels"). The compiled form computes each row in one
pass.

Which modules qualify is decided by behaviour, not by class name: a module with a one-dimensional
float32 weight and an epsilon is checked on random rows (a near-zero one among them, so where eps
enters shows) against its own forward, in Llama's form (`weight * normed`) and in Gemma's
(`(1 + weight) * normed`); the first form that answers as the module does is installed as that
instance's forward. LayerNorms, gated norms, norms without a weight and anything else that does
not answer alike keep their own forward. Each row is computed alone, so batching does not change
a row's result.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch
from torch import nn

from models import native

_CPU = torch.device("cpu")

_EPS_ATTRIBUTES = ("variance_epsilon", "eps", "epsilon")
_OFFSETS = (0.0, 1.0)  # Llama's weight, Gemma's 1 + weight
PARALLEL_ROWS = 64  # as csrc/rms_norm.c: fewer rows run on the calling thread


@functools.cache
def kernel() -> Callable[..., None] | None:
    library = native.library("rms_norm", "torch's RMSNorm ops")
    if library is None:
        return None
    function = library.rms_norm
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [
        pointer,
        i64,
        i64,
        i64,
        pointer,
        ctypes.c_float,
        ctypes.c_float,
        pointer,
        i64,
        ctypes.c_int,
    ]
    function.restype = None
    return function


def rms_norm(x: torch.Tensor, weight: torch.Tensor, offset: float, eps: float) -> torch.Tensor:
    """`x / sqrt(mean(x^2) + eps) * (weight + offset)` over the last dimension of a float32 CPU tensor."""
    if not x.is_contiguous():
        x = x.contiguous()  # a norm's input is a fresh activation: contiguous but for rare layouts
    dim = x.shape[-1]
    rows = x.numel() // dim if dim else 0
    out = torch.empty(x.shape, dtype=torch.float32, device=_CPU)
    if rows:
        # Threads are asked for only where the kernel would use them: the call is cheaper without.
        threads = torch.get_num_threads() if rows >= PARALLEL_ROWS else 1
        kernel()(x.data_ptr(), rows, dim, dim, weight.data_ptr(), offset, eps, out.data_ptr(), dim, threads)
    return out


def _epsilon(module: nn.Module) -> float | None:
    for name in _EPS_ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, float) and value >= 0:
            return value
    return None


def _candidate(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        not any(True for _ in module.children())
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 1
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.is_contiguous()
        and _epsilon(module) is not None
    )


def _probe(dim: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(dim)
    rows = torch.randn(5, dim, generator=generator)
    rows[1] *= 1e-4  # a mean square near eps: an eps added elsewhere (or not at all) shows here
    rows[2] *= 300.0
    return rows.view(1, 5, dim)


def _matching_offset(module: nn.Module, forward: Callable, eps: float) -> float | None:
    probe = _probe(module.weight.shape[0])
    try:
        with torch.inference_mode():
            expected = forward(probe)
    except Exception:  # noqa: BLE001 - a norm that takes other arguments is simply not ours
        return None
    if (
        not isinstance(expected, torch.Tensor)
        or expected.shape != probe.shape
        or expected.dtype != torch.float32
    ):
        return None
    for offset in _OFFSETS:
        with torch.inference_mode():
            actual = rms_norm(probe, module.weight, offset, eps)
        # Per row: the tiny row's outputs are of the same size as the others', so one scale fits all.
        if torch.allclose(actual, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()) + 1e-7):
            return offset
    return None


def _install(module: nn.Module, offset: float, eps: float) -> None:
    weight, original = module.weight, module.forward

    def forward(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # Extra arguments (a gate, say) or another dtype: the module's own forward, as checked.
        if args or kwargs or hidden_states.dtype is not torch.float32 or not hidden_states.is_cpu:
            return original(hidden_states, *args, **kwargs)
        return rms_norm(hidden_states, weight, offset, eps)

    module.forward = forward  # the instance's own: class, attributes and state dict stay as they were
    module.fused_rms_norm = (weight, offset, eps)  # what `models.lean_decode` calls directly


def fuse_rms_norms(model: nn.Module) -> str:
    """Give every RMSNorm of `model` that the compiled form reproduces that form as its forward;
    returns a one-line decision for the log."""
    if kernel() is None:
        return "fused CPU RMSNorm: off (kernel not built here)"
    candidates = [module for module in model.modules() if _candidate(module)]
    fused = 0
    for module in candidates:
        eps = _epsilon(module)
        offset = _matching_offset(module, module.forward, eps)
        if offset is not None:
            _install(module, offset, eps)
            fused += 1
    if not fused:
        return f"fused CPU RMSNorm: off (none of {len(candidates)} normalisation layers is an RMSNorm it reproduces)"
    return f"fused CPU RMSNorm: on for {fused} of {len(candidates)} normalisation layers"
