"""Decode-only steps of Llama-template CPU replicas as one flat function over the same kernels.

Outside its linear layers and attention, a batch-1 decode step of the bench model spent 3-4.5 ms
(`bench.step_split`, docs/BENCHMARKS.md): the Python around the arithmetic, repeated per layer
(each module through `nn.Module.__call__`, the decoder layer's and attention's keyword plumbing,
config reads, the attention wrapper's checks, the sibling products' hand-out). Where the decoder's
layers are known to compute exactly the Llama template, a step whose rows all decode runs here
instead: the same callables (packed products, fused norms, the modeling module's own rotary
function, the paged decode attention), in the same order, on the same values, without the
modules around them. Where every one of those is a project kernel, the layers run as compiled calls
with the model's activation between them (`models.lean_native`); elsewhere, the Python loop here.

What makes that safe:

- the classes: only decoder layers whose forward is the template (`_TEMPLATE_LAYERS`) under a
  model and head that add nothing to it, and only the children that forward reads;
- what each layer's attention call asks for (its window or chunk, its scaling, nothing beyond
  plain attention) is recorded from the runner's own step, not derived again (`ObservedCall`);
- startup probes (`verify`) run decode steps both ways, rows of different lengths together, and
  the path is kept only when the logits are bit-identical: greedy outputs, batch invariance and
  the self-test's comparison with the model's own forward carry over unchanged.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from models import attention, lean_native
from models.attention import LayerRule, ObservedCall
from models.cpu_kernels import PackedLinear, SharedProductMember
from models.cpu_norms import rms_norm
from models.plan import PlanRow

log = logging.getLogger(__name__)

# Decoder layers whose forward is norm -> attention -> residual -> norm -> MLP -> residual, with
# attention q/k/v -> (per-head norms, Qwen3) -> the module's apply_rotary_pos_emb -> attention
# interface -> o_proj, and MLP down(act(gate(x)) * up(x)), in transformers 5.
_TEMPLATE_LAYERS = frozenset(
    {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"}
)
# Their decoders: embed, rotary embedding once per forward, layers, final norm; nothing else.
_TEMPLATE_DECODERS = frozenset({"LlamaModel", "MistralModel", "Qwen2Model", "Qwen3Model"})
# Heads that turn the decoder's last states into logits with `lm_head` alone.
_TEMPLATE_HEADS = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "LlavaForConditionalGeneration",
    }
)
_DECODER_CHILDREN = {"embed_tokens", "layers", "norm", "rotary_emb"}
_LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTENTION_CHILDREN = (
    {"q_proj", "k_proj", "v_proj", "o_proj"},
    {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"},
)
_MLP_CHILDREN = ({"gate_proj", "up_proj", "down_proj", "act_fn"}, {"gate_proj", "up_proj", "down_proj"})
_ROTARY_NAME = "apply_rotary_pos_emb"
PROBE_LENGTHS = (3, 21, 70)  # prompt lengths decoded together by `verify`: one, two and five blocks of 16
PROBE_STEPS = 3


def _children(module: nn.Module) -> set[str]:
    return {name for name, _ in module.named_children()}


def _norm(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    fused = getattr(module, "fused_rms_norm", None)  # (weight, offset, eps), set by `models.cpu_norms`
    if fused is None:
        return module
    weight, offset, eps = fused
    return lambda x: rms_norm(x, weight, offset, eps)


def _linear(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return module.compute if isinstance(module, PackedLinear) else module


def _siblings(modules: list[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The one product that computes `modules` side by side, in order, when they share one."""
    if not all(isinstance(module, SharedProductMember) for module in modules):
        return None
    product = modules[0].product
    if any(m.product is not product for m in modules) or [m.index for m in modules] != list(
        range(len(product.sizes))
    ):
        return None
    return product.compute


@dataclass(slots=True)
class _Layer:
    index: int
    attention_norm: Callable
    mlp_norm: Callable
    qkv: Callable | None  # one call for q, k and v side by side, or None: three calls
    q: Callable
    k: Callable
    v: Callable
    q_norm: Callable | None
    k_norm: Callable | None
    o: Callable
    gate_up: Callable | None
    gate: Callable
    up: Callable
    down: Callable
    act: Callable
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    namespace: ModuleType  # the modeling module, whose rotary function the layer calls
    modules: dict[str, nn.Module]  # the layer's parts by the names above (`models.lean_native` reads them)
    rule: LayerRule | None = None  # from the runner's own step (`verify`)
    scaling: float | None = None


class LeanDecode:
    """Runs a decode-only step (`forward`) over the layers `build` recognised."""

    def __init__(self, decoder: nn.Module, head: nn.Module, layers: list[_Layer]) -> None:
        self.embed = decoder.embed_tokens
        self.rotary = decoder.rotary_emb
        self.norm = _norm(decoder.norm)
        self.head = _linear(head)
        self.layers = layers
        self.native: lean_native.NativeLayers | None = None  # set by `adopt` where it applies
        self.native_allowed = True

    def adopt(self, observed: dict[int, ObservedCall]) -> str | None:
        """Take each layer's rule and scaling from what its attention call did in the runner's
        step; the reason it cannot when one did more than plain attention or did not run."""
        for layer in self.layers:
            call = observed.get(layer.index)
            if call is None:
                return f"layer {layer.index}'s attention was not called"
            if not call.plain:
                return f"layer {layer.index}'s attention is not plain (soft-capping, sinks or a bias)"
            layer.rule, layer.scaling = call.rule, call.scaling
        self.native = lean_native.build(self) if self.native_allowed else None
        return None

    def forward(self, ids: torch.Tensor, position_ids: torch.Tensor, layout) -> torch.Tensor:
        """Logits [T, vocab] of a step whose T rows each decode one token (`ids` [T]), at
        `position_ids` [1, T], written to and attending over `layout`'s pool."""
        x = self.embed(ids)  # [T, hidden]
        cos, sin = self.rotary(x[None], position_ids)
        native = self.native
        if native is not None and native.takes(layout, cos, sin):
            return self.head(self.norm(native.forward(x, cos, sin, layout)))
        tokens = x.shape[0]
        cache, slots = layout.cache, layout.slot_mapping
        plain = attention.PLAIN
        for layer in self.layers:
            heads, kv_heads, dim = layer.heads, layer.kv_heads, layer.head_dim
            h = layer.attention_norm(x)
            if layer.qkv is not None:
                qkv = layer.qkv(h)
                q_width, kv_width = heads * dim, kv_heads * dim
                q = qkv[:, :q_width]
                k = qkv[:, q_width : q_width + kv_width]
                v = qkv[:, q_width + kv_width :]
            else:
                q, k, v = layer.q(h), layer.k(h), layer.v(h)
            q = q.view(1, tokens, heads, dim)
            k = k.view(1, tokens, kv_heads, dim)
            if layer.q_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            value_dim = v.shape[-1] // kv_heads
            v = v.view(tokens, kv_heads, value_dim)
            key_pool, value_pool = cache.layer_pools(layer.index)  # written by `verify`'s first step
            rotate = getattr(layer.namespace, _ROTARY_NAME)
            # The compiled rotary function also stores the keys and values where `into_pool` exists.
            into_pool = getattr(rotate, "into_pool", None)
            rotated = into_pool(q, k, v, cos, sin, key_pool, value_pool, slots) if into_pool else None
            if rotated is not None:
                q = rotated
            else:
                q, k = rotate(q, k, cos, sin)
                key_pool.view(-1, kv_heads, dim).index_copy_(0, slots, k[0].transpose(0, 1))
                value_pool.view(-1, kv_heads, value_dim).index_copy_(0, slots, v)
            out = attention.decode_attention(
                layout, key_pool, value_pool, q, layer.scaling, layer.rule, plain
            )
            x = x + layer.o(out.transpose(1, 2).reshape(tokens, heads * value_dim))
            h = layer.mlp_norm(x)
            if layer.gate_up is not None:
                both = layer.gate_up(h)
                # The activation gets the contiguous input the modules' path gives it: torch's
                # vectorised loop and its scalar tail round SiLU differently (a strided [16, 2050]
                # slice gave one element apart from its contiguous copy); a product is exact.
                gate = both[:, : layer.intermediate].contiguous()
                up = both[:, layer.intermediate :]
            else:
                gate, up = layer.gate(h), layer.up(h)
            x = x + layer.down(layer.act(gate) * up)
        return self.head(self.norm(x))


def build(model: nn.Module) -> tuple[LeanDecode | None, str]:
    """The lean step for `model` when its classes and structure are the template's, else None;
    and a phrase saying which (before `verify`)."""
    if type(model).__name__ not in _TEMPLATE_HEADS:
        return None, f"{type(model).__name__} is not a head it knows"
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(decoder).__name__ not in _TEMPLATE_DECODERS or not isinstance(head, nn.Module):
        return None, f"{type(decoder).__name__} is not a decoder it knows"
    if _children(decoder) != _DECODER_CHILDREN or type(decoder.embed_tokens) is not nn.Embedding:
        return None, "the decoder has other parts than the template's"
    if decoder.embed_tokens.max_norm is not None:
        return None, "the embedding renormalises its rows"
    layers = []
    # The decoder runs the first `num_hidden_layers` of its list (a list may hold more).
    count = getattr(decoder.config, "num_hidden_layers", len(decoder.layers))
    for index, layer in enumerate(decoder.layers[:count]):
        if type(layer).__name__ not in _TEMPLATE_LAYERS or _children(layer) != _LAYER_CHILDREN:
            return None, f"layer {index} ({type(layer).__name__}) is not the template"
        attn, mlp = layer.self_attn, layer.mlp
        if _children(attn) not in _ATTENTION_CHILDREN or _children(mlp) not in _MLP_CHILDREN:
            return None, f"layer {index}'s attention or MLP has other parts than the template's"
        if getattr(attn, "layer_idx", None) != index:
            return None, f"layer {index}'s attention says it is layer {getattr(attn, 'layer_idx', None)}"
        namespace = sys.modules.get(type(attn).__module__)
        if not callable(getattr(namespace, _ROTARY_NAME, None)):
            return None, f"layer {index}'s module has no {_ROTARY_NAME}"
        config = attn.config
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        gate, up = mlp.gate_proj, mlp.up_proj
        layers.append(
            _Layer(
                index=index,
                attention_norm=_norm(layer.input_layernorm),
                mlp_norm=_norm(layer.post_attention_layernorm),
                qkv=_siblings([attn.q_proj, attn.k_proj, attn.v_proj]),
                q=_linear(attn.q_proj),
                k=_linear(attn.k_proj),
                v=_linear(attn.v_proj),
                q_norm=_norm(attn.q_norm) if hasattr(attn, "q_norm") else None,
                k_norm=_norm(attn.k_norm) if hasattr(attn, "k_norm") else None,
                o=_linear(attn.o_proj),
                gate_up=_siblings([gate, up]),
                gate=_linear(gate),
                up=_linear(up),
                down=_linear(mlp.down_proj),
                act=mlp.act_fn,
                heads=heads,
                kv_heads=kv_heads,
                head_dim=attn.head_dim,
                intermediate=gate.out_features,
                namespace=namespace,
                modules={
                    "attention_norm": layer.input_layernorm,
                    "mlp_norm": layer.post_attention_layernorm,
                    **{name: getattr(attn, f"{name}_proj") for name in ("q", "k", "v", "o")},
                    **{name: getattr(mlp, f"{name}_proj") for name in ("gate", "up", "down")},
                    **({"q_norm": attn.q_norm, "k_norm": attn.k_norm} if hasattr(attn, "q_norm") else {}),
                },
            )
        )
    if not layers:
        return None, "the decoder has no layers"
    return LeanDecode(decoder, head, layers), f"{len(layers)} {type(decoder.layers[0]).__name__}s"


def verify(runner, lean: LeanDecode) -> str | None:
    """Decode probe rows of different lengths together through the runner's own step and the lean
    one; None when every step's logits are bit-identical, else why not. Uses the pool's first
    blocks, which the scheduler zeroes when it hands them out."""
    block_size, vocab = runner.block_size, runner.model.config.get_text_config(decoder=True).vocab_size
    widths = [-(-(length + PROBE_STEPS) // block_size) for length in PROBE_LENGTHS]
    if sum(widths) > runner.num_blocks:
        return "the KV pool is too small for its check"
    rows, first = [], 0
    for index, (length, width) in enumerate(zip(PROBE_LENGTHS, widths, strict=True)):
        ids = [(7 * position + 3 * index + 1) % vocab for position in range(length)]
        rows.append(PlanRow(-1 - index, ids, 0, list(range(first, first + width)), [None]))
        first += width
    runner.lean = None
    runner.forward_eager(rows)  # the prompts' keys and values
    for step in range(PROBE_STEPS):
        rows = [
            PlanRow(row.seq_id, [(row.end * 5 + step) % vocab], row.end, row.block_table, [None])
            for row in rows
        ]
        runner.lean, runner.observing = None, {}
        try:
            expected = runner.forward_eager(rows)
            observed = runner.observing
        finally:
            runner.observing = None
        if step == 0:
            reason = lean.adopt(observed)
            if reason is not None:
                return reason
        runner.lean = lean
        try:
            actual = runner.forward_eager(rows)  # writes the same keys and values again
        finally:
            runner.lean = None
        if actual.shape != expected.shape or not torch.equal(actual, expected):
            return "its logits differ from the runner's own step"
    return None


def install(runner) -> str:
    """Give `runner` the lean step when the model is the template's and it answers bit for bit as
    the runner's own step, with its compiled layers (`models.lean_native`) where they apply and
    answer alike too; returns a one-line decision for the log."""
    lean, what = build(runner.model)
    if lean is None:
        return f"lean decode step: off ({what})"
    reason, compiled = None, "compiled layers off (not every part is a project kernel)"
    for allowed in (True, False):
        lean.native_allowed = allowed
        try:
            with torch.inference_mode():
                reason = verify(runner, lean)
        except Exception as exc:  # noqa: BLE001 - an optimisation: any failure keeps the runner's own step
            log.debug("lean decode check raised", exc_info=True)
            reason = f"its check raised {type(exc).__name__}: {exc}"
        if reason is None:
            if lean.native is not None:
                compiled = "compiled layers on"
            break
        if lean.native is None:
            break  # the Python loop itself did not answer alike: no second try
        compiled = f"compiled layers off ({reason})"
    if reason is not None:
        return f"lean decode step: off ({reason})"
    runner.lean = lean
    return (
        f"lean decode step: on ({what}; {compiled}; decode-only steps bit-identical to the model's modules)"
    )
