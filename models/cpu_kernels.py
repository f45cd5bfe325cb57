"""oneDNN pre-packed weights for nn.Linear on CPU, where they are measured to pay.

Decode on CPU is dominated by skinny matmuls (`[batch, hidden] x [hidden, out]`); oneDNN with the
weight reordered once into its blocked layout runs them ~1.7x faster than `F.linear` at batch
1-16 on this project's CI machine for the bench model's 768-wide layers. For small layers the
call's fixed cost wins instead: on the 64-wide builtin:tiny, packing made a batch-1 decode step
1.9-3.3 ms against 1.2 ms with `F.linear` (docs/BENCHMARKS.md). So each distinct layer shape is
timed both ways at startup, at batch 1 and at the batch hint, and packed only when oneDNN is the
faster. The original weight stays in place (tied embeddings and any code reading `.weight` keep
working), so packing costs one extra copy of the packed weights; it is skipped when that copy
would be large.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

_MAX_EXTRA_BYTES = 4 << 30


def packing_supported() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, batch_hint: int) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")


_TIMING_ROUNDS = 20


def _best_seconds(call: Callable[[], object]) -> float:
    call()  # first call: oneDNN's primitive creation, allocator warm-up
    best = float("inf")
    for _ in range(_TIMING_ROUNDS):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def packing_pays(linear: nn.Linear, batch_hint: int) -> bool:
    """Whether oneDNN with the packed weight beats `F.linear` for this layer's shape, summed over
    a batch-1 and a `batch_hint` decode (the best of a few rounds each, so noise is small next to
    the gaps that matter)."""
    packed = PackedLinear(linear, batch_hint)
    plain = packed_total = 0.0
    with torch.inference_mode():
        for rows in (1, batch_hint):
            x = torch.randn(rows, linear.in_features)
            plain += _best_seconds(lambda x=x: F.linear(x, linear.weight, linear.bias))
            packed_total += _best_seconds(lambda x=x: packed(x))
    return packed_total < plain


def pack_linears(
    model: nn.Module, *, batch_hint: int = 16, pays: Callable[[nn.Linear, int], bool] = packing_pays
) -> str:
    """Swap the fp32 CPU nn.Linear layers whose shape `pays` for a PackedLinear; returns a
    one-line decision for the log."""
    if not packing_supported():
        return "packed CPU linears: off (oneDNN unavailable)"
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and module.weight.device.type == "cpu"
        and module.weight.dtype == torch.float32
    ]
    if not targets:
        return "packed CPU linears: off (no fp32 CPU linear layers)"
    verdicts: dict[tuple[int, int, bool], bool] = {}
    for _, module in targets:
        shape = (module.in_features, module.out_features, module.bias is not None)
        if shape not in verdicts:
            verdicts[shape] = pays(module, batch_hint)
    total = len(targets)
    targets = [
        (name, m) for name, m in targets if verdicts[(m.in_features, m.out_features, m.bias is not None)]
    ]
    if not targets:
        return f"packed CPU linears: off (F.linear measured faster for all {total} layers' shapes)"
    extra = sum(m.weight.numel() * m.weight.element_size() for _, m in targets)
    if extra > _MAX_EXTRA_BYTES:
        return f"packed CPU linears: off (would need {extra / 2**30:.1f} GiB more memory)"
    with torch.no_grad():
        for name, module in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, PackedLinear(module, batch_hint))
    return (
        f"packed CPU linears: on for {len(targets)} of {total} layers (the shapes where oneDNN "
        f"measured faster; {extra / 2**20:.0f} MiB extra)"
    )
