"""Pre-packed weights for the nn.Linear layers on CPU that are large enough to gain.

Two backends pack them: the compiled panel kernel (`models.panel_linear`) where the CPU has
AVX-512 and a C compiler is present, and oneDNN's packed call otherwise. What follows was
measured with oneDNN's, the first of the two.

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

Sibling layers that read the same input in every call (a Llama's q/k/v projections, its gate and
up projections) are packed as one product and run as one call. Small layers stream their weights
from memory at about half the rate large ones do (`bench.linears`, batch 1: 768x256 at 10 GB/s,
768x8192 at 20-24), so one 768x1280 call costs less than a 768x768 and two 768x256 calls: on the
bench model a decode step at batch 1 took 2-3 ms (7-10%) less in two runs of 10 and 16 interleaved
rounds, and at batch 16 no measurable difference either way (`bench.host --compare-packing`,
docs/BENCHMARKS.md). Which siblings share an input is recorded during the startup self-test
(`SharedInputs`), not guessed from layer names, and each call still checks that its input is the
very tensor the product was computed from, computing it anew otherwise: a grouping that does not
hold costs time, never correctness.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from models import panel_linear

log = logging.getLogger(__name__)

_MAX_EXTRA_BYTES = 4 << 30


def packing_supported() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDNNProduct:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int) -> None:
        self.bias = bias
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")


_BACKEND_NAMES = {"panels": "compiled panel kernel", "onednn": "oneDNN"}


def default_backend() -> str:
    return "panels" if panel_linear.available() else "onednn"


def _product(weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int, backend: str):
    if backend == "panels":
        product = panel_linear.PanelProduct(weight, bias)
        if product.agrees_with(weight, bias):
            return product
        log.warning(
            "the panel kernel disagrees with F.linear on a %dx%d layer; it keeps oneDNN's packed call",
            weight.shape[1],
            weight.shape[0],
        )
    return OneDNNProduct(weight, bias, batch_hint)


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, batch_hint: int, backend: str = "onednn") -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.compute = _product(linear.weight, linear.bias, batch_hint, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compute(x)


class SharedProduct:
    """One packed product for sibling linears of one input; each member takes its slice once.

    The slices of the last computed product are handed out to the members that have not taken
    theirs yet, as long as they are called with the tensor it was computed from (the object, not
    equal values); any other call computes the product anew. The engine runs under inference
    mode, where tensors keep no version counter: an input changed in place between two siblings'
    calls would go unseen, and no model does that between projections of one hidden state."""

    def __init__(self, linears: Sequence[nn.Linear], batch_hint: int, backend: str = "onednn") -> None:
        weight = torch.cat([linear.weight.detach() for linear in linears])
        bias = None if linears[0].bias is None else torch.cat([linear.bias.detach() for linear in linears])
        self.sizes = [linear.out_features for linear in linears]
        self._offsets = [sum(self.sizes[:index]) for index in range(len(self.sizes))]
        self.compute = _product(weight, bias, batch_hint, backend)
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._untaken: list[bool] = []
        self._left = 0

    def take(self, index: int, x: torch.Tensor) -> torch.Tensor:
        untaken = self._untaken
        if self._input is not x or not untaken[index]:
            self._output = self.compute(x)
            self._input = x
            untaken = self._untaken = [True] * len(self.sizes)
            self._left = len(untaken)
        untaken[index] = False
        piece = self._output.narrow(-1, self._offsets[index], self.sizes[index])
        self._left -= 1
        if not self._left:
            self._input = self._output = None  # everything handed out: keep no activation alive
        # Rows of a slice are strided by the whole product's width; models may `.view` them.
        return piece if piece.is_contiguous() else piece.contiguous()


class SharedProductMember(nn.Module):
    def __init__(self, linear: nn.Linear, product: SharedProduct, index: int) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.product = product
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product.take(self.index, x)


def _packable(module: nn.Module) -> bool:
    return (
        type(module) is nn.Linear
        and module.weight.device.type == "cpu"
        and module.weight.dtype == torch.float32
    )


class SharedInputs:
    """Records, over the forward passes run inside it, which input tensor each packable linear
    gets; `groups()` then names the sibling layers (same parent, input width and bias presence)
    that got the same tensor in every call, in module order."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._calls: dict[str, list[int]] = defaultdict(list)
        self._handles: list = []
        # id() -> (the tensor, weakly; its token). A tensor freed between two layers' calls (fc1's
        # input, then fc2's) can leave its id to the next one: the dead weak reference tells them apart.
        self._tokens: dict[int, tuple[weakref.ref, int]] = {}
        self._next_token = itertools.count()

    def __enter__(self) -> SharedInputs:
        for name, module in self._model.named_modules():
            if _packable(module):
                self._handles.append(module.register_forward_pre_hook(self._recorder(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._tokens.clear()

    def _recorder(self, name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                self._calls[name].append(-1)
                return
            known = self._tokens.get(id(x))
            if known is None or known[0]() is not x:
                known = (weakref.ref(x), next(self._next_token))
                self._tokens[id(x)] = known
            self._calls[name].append(known[1])

        return record

    def groups(self) -> list[list[str]]:
        siblings: dict[tuple, list[str]] = defaultdict(list)
        for name, module in self._model.named_modules():
            calls = self._calls.get(name)
            if calls and -1 not in calls:
                parent = name.rpartition(".")[0]
                siblings[(parent, module.in_features, module.bias is None, tuple(calls))].append(name)
        return [names for names in siblings.values() if len(names) > 1]


# From 384x384-sized layers on (a Llama's narrow k/v projections, 768x256, included): there packing
# wins at the batch sizes continuous batching runs, and loses at batch 1 by less than it wins.
PACK_MIN_WEIGHTS = 2**17


def packing_pays(linear: nn.Linear, batch_hint: int) -> bool:
    return linear.in_features * linear.out_features >= PACK_MIN_WEIGHTS


def pack_linears(
    model: nn.Module,
    *,
    batch_hint: int = 16,
    pays: Callable[[nn.Linear, int], bool] = packing_pays,
    shared: Sequence[Sequence[str]] = (),
    backend: str | None = None,
) -> str:
    """Swap each fp32 CPU nn.Linear that `pays(linear, batch_hint)` approves for a PackedLinear,
    and each group in `shared` (names of siblings fed the same input, from `SharedInputs`) whose
    combined layer pays for members of one SharedProduct; returns a one-line decision for the log."""
    backend = backend or default_backend()
    if backend == "onednn" and not packing_supported():
        return "packed CPU linears: off (oneDNN unavailable)"
    targets = {name: module for name, module in model.named_modules() if _packable(module)}
    if not targets:
        return "packed CPU linears: off (no fp32 CPU linear layers)"
    groups = [
        [targets[name] for name in names]
        for names in shared
        if len(names) > 1 and all(name in targets for name in names)
    ]
    groups = [
        group
        for group in groups
        if pays(
            nn.Linear(group[0].in_features, sum(m.out_features for m in group), device="meta"), batch_hint
        )
    ]
    grouped = {id(module) for group in groups for module in group}
    singles = [m for m in targets.values() if id(m) not in grouped and pays(m, batch_hint)]
    if not singles and not groups:
        return f"packed CPU linears: off (none of the {len(targets)} layers is large enough to gain)"
    packed = singles + [module for group in groups for module in group]
    extra = sum(m.weight.numel() * m.weight.element_size() for m in packed)
    if extra > _MAX_EXTRA_BYTES:
        return f"packed CPU linears: off (would need {extra / 2**30:.1f} GiB more memory)"
    names = {id(module): name for name, module in targets.items()}
    with torch.no_grad():
        for module in singles:
            _replace(model, names[id(module)], PackedLinear(module, batch_hint, backend))
        for group in groups:
            product = SharedProduct(group, batch_hint, backend)
            for index, module in enumerate(group):
                _replace(model, names[id(module)], SharedProductMember(module, product, index))
    return (
        f"packed CPU linears ({_BACKEND_NAMES[backend]}): on for {len(packed)} of {len(targets)} layers (those of at least "
        f"{PACK_MIN_WEIGHTS} weights; {len(groups)} groups of siblings sharing an input run as one "
        f"product; {extra / 2**20:.0f} MiB extra)"
    )


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
