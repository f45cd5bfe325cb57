"""oneDNN pre-packed weights for the nn.Linear layers on CPU that are large enough to gain.

Decode on CPU is dominated by skinny matmuls (`[batch, hidden] x [hidden, out]`); oneDNN with the
weight reordered once into its blocked layout runs them ~1.7x faster than `F.linear` at batch
1-16 on this project's CI machine for the bench model's 768-wide layers. But the packed call
has a fixed cost of about 15-20 us, so small layers run faster through `F.linear`: timed one layer
at a time (batch 1 and 16, 2 threads), `F.linear` wins up to 256x256 (7 against 22 us at batch
1, 30 against 28 at batch 16); from 384x384 packing wins at batch 16 (68 against 81 us) while
`F.linear` still wins at batch 1 by about 13 us, and from 512x512 packing wins at both
(docs/BENCHMARKS.md). Layers are therefore packed
from `PACK_MIN_WEIGHTS` weights on: a fixed rule rather than a timing at startup, whose verdicts
flipped when the machine was busy (as it is when several replicas load at once). The original
weight stays in place (tied embeddings and any code reading `.weight` keep working), so packing
costs one extra copy of the packed weights; it is skipped when that copy would be large.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
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


# From 384x384-sized layers on (a Llama's narrow k/v projections, 768x256, included): there packing
# wins at the batch sizes continuous batching runs, and loses at batch 1 by less than it wins.
PACK_MIN_WEIGHTS = 2**17


def packing_pays(linear: nn.Linear, batch_hint: int) -> bool:
    return linear.in_features * linear.out_features >= PACK_MIN_WEIGHTS


def pack_linears(
    model: nn.Module, *, batch_hint: int = 16, pays: Callable[[nn.Linear, int], bool] = packing_pays
) -> str:
    """Swap each fp32 CPU nn.Linear that `pays(linear, batch_hint)` approves for a PackedLinear;
    returns a one-line decision for the log."""
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
    total = len(targets)
    targets = [(name, module) for name, module in targets if pays(module, batch_hint)]
    if not targets:
        return f"packed CPU linears: off (none of the {total} layers is large enough to gain)"
    extra = sum(m.weight.numel() * m.weight.element_size() for _, m in targets)
    if extra > _MAX_EXTRA_BYTES:
        return f"packed CPU linears: off (would need {extra / 2**30:.1f} GiB more memory)"
    with torch.no_grad():
        for name, module in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, PackedLinear(module, batch_hint))
    return (
        f"packed CPU linears: on for {len(targets)} of {total} layers (those of at least "
        f"{PACK_MIN_WEIGHTS} weights; {extra / 2**20:.0f} MiB extra)"
    )
