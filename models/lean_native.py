"""The lean decode step's layers as compiled calls (`csrc/decode_layers.c`), where every piece qualifies.

`models.lean_decode` runs a decode-only step as a flat Python loop over the same kernels the
modules call. On the bench model about 150 small torch operations and calls per batch-1 step
remained around those kernels (views, slices, allocations, the residual sums, each call's
argument checks): 1.7-2 ms of a 10-13 ms step (`bench.step_split`). `decode_layers.c` runs a
layer's glue in C between the same compiled kernels, reached through their function pointers,
so a layer costs Python two calls and the model's own activation function.

It applies when every linear of the layers is a panel product (`models.panel_linear`), every
norm a fused RMSNorm (`models.cpu_norms`), the rotary function the fused one with its pool
write (`models.cpu_rotary`) and the decode attention the in-place kernel
(`models.cpu_attention`) for every layer's shapes; otherwise, and for any step it does not
take, the Python loop runs. `lean_decode.verify` compares it bit for bit with the modules.
"""

from __future__ import annotations

import ctypes
import functools
import math

import torch

from models import cpu_attention, cpu_rotary, native, panel_linear
from models.cpu_kernels import PackedLinear, SharedProductMember
from models.cpu_norms import kernel as norm_kernel

_CPU = torch.device("cpu")
_P, _I64, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class _Kernels(ctypes.Structure):
    _fields_ = [("linear", _P), ("norm", _P), ("rotary", _P), ("attention", _P)]


class _Product(ctypes.Structure):
    _fields_ = [("panels", _P), ("bias", _P)]


class _Norm(ctypes.Structure):
    _fields_ = [("weight", _P), ("offset", _F), ("eps", _F)]


class _Layer(ctypes.Structure):
    _fields_ = [
        *((name, _Norm) for name in ("attention_norm", "mlp_norm", "q_norm", "k_norm")),
        *((name, _Product) for name in ("q", "k", "v", "o", "gate", "up", "down")),
        *((name, _I64) for name in ("hidden", "heads", "kv_heads", "head_dim", "value_dim", "intermediate")),
        ("key_pool", _P),
        ("value_pool", _P),
        ("scale", _F),
        ("rule", _I64),
    ]


class _Group(ctypes.Structure):
    _fields_ = [
        ("blocks", _P),
        ("blocks_row", _I64),
        ("first", _P),
        ("length", _P),
        ("rows", _P),
        ("count", _I64),
    ]


class _Ranges(ctypes.Structure):
    _fields_ = [("groups", _P), ("count", _I64)]


# The step's intermediates, in the order `_Step` lists them after `x`.
_BUFFERS = (
    "normed", "qkv", "q_normed", "k_normed", "q_rotated", "attended", "projected", "gate_up", "gate", "up",
    "product",
)  # fmt: skip


class _Step(ctypes.Structure):
    _fields_ = [
        ("tokens", _I64),
        ("threads", _I64),
        ("block_size", _I64),
        ("cos", _P),
        ("sin", _P),
        ("cos_row", _I64),
        ("rotary_dims", _I64),
        ("interleaved", _I64),
        ("slots", _P),
        ("ranges", _P),
        ("x", _P),
        *((name, _P) for name in _BUFFERS),
    ]


@functools.cache
def _run():
    library = native.library("decode_layers", "the lean step's Python loop", flags=("-ffp-contract=off",))
    if library is None:
        return None
    function = library.decode_layers_run
    function.argtypes = [_P, _P, _I64, _I64, _P, _P]
    function.restype = ctypes.c_int
    return function


def available() -> bool:
    """Whether this machine builds every kernel the compiled layers call."""
    kernels = (_run(), norm_kernel(), cpu_rotary.pool_kernel(), cpu_attention.kernel())
    return panel_linear.available() and all(kernel is not None for kernel in kernels)


def _address(function) -> int:
    return ctypes.cast(function, ctypes.c_void_p).value


def _panels(module) -> panel_linear.PanelProduct | None:
    """The panel product a packed linear (or a group of siblings) computes with, if that is one."""
    if isinstance(module, PackedLinear):
        product = module.compute
    elif isinstance(module, SharedProductMember):
        product = module.product.compute
    else:
        return None
    return product if isinstance(product, panel_linear.PanelProduct) else None


def _product(product: panel_linear.PanelProduct | None) -> _Product:
    if product is None:
        return _Product(None, None)
    return _Product(product.panels.data_ptr(), None if product.bias is None else product.bias.data_ptr())


def _norm(module) -> _Norm | None:
    fused = getattr(module, "fused_rms_norm", None)  # (weight, offset, eps) from `models.cpu_norms`
    if fused is None:
        return None
    weight, offset, eps = fused
    return _Norm(weight.data_ptr(), offset, eps)


class NativeLayers:
    """The compiled layers of one `LeanDecode`; `build` says whether they apply."""

    def __init__(self, lean, layers: list[_Layer], keep: list, rotary: cpu_rotary.FusedRotary) -> None:
        self.lean = lean
        self.count = len(layers)
        self.layers = (_Layer * self.count)(*layers)
        self.keep = keep  # tensors the structs point into
        self.rotary = rotary
        self.kernels = _Kernels(
            _address(panel_linear.kernel()),
            _address(norm_kernel()),
            _address(cpu_rotary.pool_kernel()),
            _address(cpu_attention.kernel().function),
        )
        self.run = _run()
        self.pools_of = None  # the KV cache whose pools the layers point at
        rules = []
        for layer, spec in zip(lean.layers, self.layers, strict=True):
            if layer.rule not in rules:
                rules.append(layer.rule)
            spec.rule = rules.index(layer.rule)
            scaling = layer.scaling if layer.scaling is not None else 1 / math.sqrt(layer.head_dim)
            spec.scale = float(scaling)
        self.rules = rules
        self.head_dim = lean.layers[0].head_dim
        widths = {
            "normed": max(spec.hidden for spec in self.layers),
            "qkv": max(spec.heads * spec.head_dim + spec.kv_heads * (spec.head_dim + spec.value_dim) for spec in self.layers),
            "q_normed": max(spec.heads * spec.head_dim for spec in self.layers),
            "k_normed": max(spec.kv_heads * spec.head_dim for spec in self.layers),
            "q_rotated": max(spec.heads * spec.head_dim for spec in self.layers),
            "attended": max(spec.heads * spec.value_dim for spec in self.layers),
            "projected": max(spec.hidden for spec in self.layers),
            "gate_up": max(2 * spec.intermediate for spec in self.layers),
            "gate": max(spec.intermediate for spec in self.layers),
            "up": max(spec.intermediate for spec in self.layers),
            "product": max(spec.intermediate for spec in self.layers),
        }  # fmt: skip
        # Each buffer starts on a cache line of its own.
        self.widths = [-(-widths[name] // 16) * 16 for name in _BUFFERS]
        self.intermediate = widths["gate"]
        self.capacity = 0  # rows the workspace holds
        self.workspace = torch.empty(0)
        self.step = _Step(interleaved=int(rotary.interleaved))
        self.gate = torch.empty(0)

    def _attach_pools(self, cache) -> bool:
        """Point the layers at `cache`'s pools (allocated by the first step that wrote them, never
        replaced after); False when one is not the contiguous float32 the kernels read."""
        pools = [cache.layer_pools(layer.index) for layer in self.lean.layers]
        if not all(pool.is_contiguous() and pool.dtype is torch.float32 for pair in pools for pool in pair):
            return False
        for spec, (keys, values) in zip(self.layers, pools, strict=True):
            spec.key_pool, spec.value_pool = keys.data_ptr(), values.data_ptr()
        self.step.block_size = cache.block_size
        self.pools_of = cache
        return True

    def _size(self, tokens: int) -> None:
        """Room for `tokens` rows in every intermediate, kept for later steps of that size or less."""
        if tokens > self.capacity:
            self.workspace = torch.empty(tokens * sum(self.widths), dtype=torch.float32, device=_CPU)
            self.capacity = tokens
        base, offset = self.workspace.data_ptr(), 0
        for name, width in zip(_BUFFERS, self.widths, strict=True):
            setattr(self.step, name, base + 4 * offset)
            if name == "gate":
                self.gate = self.workspace[offset : offset + tokens * self.intermediate].view(
                    tokens, self.intermediate
                )
            offset += tokens * width
        self.step.tokens = tokens

    def takes(self, layout, cos: torch.Tensor, sin: torch.Tensor) -> bool:
        """Whether the step's attention and angles are what the kernels take (as the rotary
        function's own check: [1, T, R] float32 angles, unit stride along R, laid out alike)."""
        if layout.cache is not self.pools_of and not self._attach_pools(layout.cache):
            return False
        return (
            layout.in_place_decode
            and cos.dtype is torch.float32
            and sin.dtype is torch.float32
            and cos.dim() == 3
            and cos.shape == sin.shape
            and cos.stride() == sin.stride()
            and cos.stride(2) == 1
            and cos.shape[2] % 2 == 0
            and (cos.shape[2] == self.head_dim or (self.rotary.partial and 0 < cos.shape[2] < self.head_dim))
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout) -> torch.Tensor:
        """The decoder layers over `x` [T, hidden] (updated in place and returned)."""
        tokens = x.shape[0]
        if tokens != self.step.tokens:  # the buffers are laid out for the step's row count
            self._size(tokens)
        step = self.step
        step.threads = torch.get_num_threads()
        step.cos, step.sin = cos.data_ptr(), sin.data_ptr()
        step.cos_row, step.rotary_dims = cos.stride(1), cos.shape[2]
        slots = layout.slot_mapping
        step.slots = slots.data_ptr()
        step.x = x.data_ptr()
        keep = [slots]
        ranges = (_Ranges * len(self.rules))()
        for index, rule in enumerate(self.rules):
            groups = (_Group * len(layout.decode_groups))()
            for group, spec in zip(layout.decode_groups, groups, strict=True):
                first, length = group.key_range(rule)
                blocks = group.blocks if group.blocks.stride(-1) == 1 else group.blocks.contiguous()
                keep.append(blocks)
                spec.blocks, spec.blocks_row = blocks.data_ptr(), blocks.stride(0)
                spec.first, spec.length = first.data_ptr(), length.data_ptr()
                spec.rows = None if group.rows is None else group.rows.data_ptr()
                spec.count = blocks.shape[0]
            keep.append(groups)
            ranges[index] = _Ranges(ctypes.addressof(groups), len(groups))
        step.ranges = ctypes.addressof(ranges)
        run, kernels, layers, count, step_ref = (
            self.run,
            ctypes.byref(self.kernels),
            self.layers,
            self.count,
            ctypes.byref(step),
        )
        gate = self.gate
        failed = run(kernels, layers, count, 0, step_ref, None)
        for index, layer in enumerate(self.lean.layers, 1):
            activated = layer.act(gate)  # held until the call that reads it returns
            failed = failed or run(kernels, layers, count, index, step_ref, activated.data_ptr())
        if failed:
            raise MemoryError("decode attention: no memory for the partial results of long rows")
        return x


def build(lean) -> NativeLayers | None:
    """The compiled layers for `lean` (a `LeanDecode`) when every piece of every layer is one of the
    project's kernels, else None."""
    if not available():
        return None
    rotaries = {id(getattr(layer.namespace, "apply_rotary_pos_emb", None)) for layer in lean.layers}
    rotary = getattr(lean.layers[0].namespace, "apply_rotary_pos_emb", None)
    if len(rotaries) != 1 or not isinstance(rotary, cpu_rotary.FusedRotary):
        return None
    limit, tile = cpu_attention.kernel().max_task_floats, cpu_attention.kernel().tile
    specs, keep = [], []
    for layer in lean.layers:
        modules = layer.modules
        norms = [_norm(modules[name]) for name in ("attention_norm", "mlp_norm")]
        qk_norms = [
            _norm(modules[name]) if name in modules else _Norm(None, 0.0, 0.0)
            for name in ("q_norm", "k_norm")
        ]
        if any(norm is None for norm in (*norms, *qk_norms)):
            return None
        products = {name: _panels(modules[name]) for name in ("q", "k", "v", "o", "gate", "up", "down")}
        if any(product is None for product in products.values()):
            return None
        heads, kv_heads, dim, inner = layer.heads, layer.kv_heads, layer.head_dim, layer.intermediate
        if heads % kv_heads or dim != lean.layers[0].head_dim:
            return None
        shared_qkv, shared_gate_up = layer.qkv is not None, layer.gate_up is not None
        q, k, v, o = (products[name] for name in "qkvo")
        gate, up, down = products["gate"], products["up"], products["down"]
        hidden = o.out_features
        if shared_qkv:
            value_dim = dim
            widths_fit = q.out_features == (heads + 2 * kv_heads) * dim
        else:
            value_dim = v.out_features // kv_heads
            widths_fit = (q.out_features, k.out_features, v.out_features) == (
                heads * dim,
                kv_heads * dim,
                kv_heads * value_dim,
            )
        widths_fit = (
            widths_fit
            and all(product.in_features == hidden for product in (q, k, v, gate, up))
            and o.in_features == heads * value_dim
            and gate.out_features == (2 * inner if shared_gate_up else inner)
            and (shared_gate_up or up.out_features == inner)
            and down.in_features == inner
            and down.out_features == hidden
        )
        if not widths_fit or heads // kv_heads * (dim + value_dim + tile) > limit:
            return None
        keep.extend(product for product in products.values())
        specs.append(
            _Layer(
                attention_norm=norms[0],
                mlp_norm=norms[1],
                q_norm=qk_norms[0],
                k_norm=qk_norms[1],
                q=_product(products["q"]),
                k=_product(None if shared_qkv else products["k"]),
                v=_product(None if shared_qkv else products["v"]),
                o=_product(products["o"]),
                gate=_product(products["gate"]),
                up=_product(None if shared_gate_up else products["up"]),
                down=_product(products["down"]),
                hidden=hidden,
                heads=heads,
                kv_heads=kv_heads,
                head_dim=dim,
                value_dim=value_dim,
                intermediate=inner,
            )
        )
    return NativeLayers(lean, specs, keep, rotary)
