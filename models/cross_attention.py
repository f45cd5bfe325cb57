"""Cross-attention to image states on the fast path (Mllama, Llama 3.2 Vision).

Mllama's text decoder has gated cross-attention layers whose keys and values come from the vision
states of the request's images, not from its tokens. Here they live in the paged pool like any
other keys and values: each image request holds "side" blocks (`Sequence.side_table`, taken and
freed by the block manager with its own blocks, so they count against the pool), written by the
request's first row after the blocks were taken (`PlanRow.with_images`). A block holds a slot in
every layer's pool, and only the cross-attention layers (8 of 40 in Llama 3.2 11B Vision) have
vision states to keep, so the keys and values of cross-attention layer j are laid out over the
side slots of all layers' pools in turn: state s of layer j is number j * S + s of the request's
n_cross * S, kept in the pool of layer (j * S + s) // C at side slot (j * S + s) % C, where C is
the side slots per layer. A request takes C = ceil(n_cross * S / n_layers) slots rather than S,
a fifth for that model.

What the model does, reproduced per packed row (transformers' `MllamaTextModel` and
`MllamaCrossAttentionDecoderLayer`):
- a text token attends to the vision tokens of the tiles its `cross_attention_mask` row allows; a
  token whose row allows none (text before the first image) attends to every vision token of the
  request evenly, and its MLP output is dropped (`full_text_row_masked_out_mask`);
- a decoded token uses the mask row of the prompt's last token (as generate() extends it);
- a request without images skips the cross-attention layers. In a step where other rows have
  images those layers run for every row, so such rows get an attention output of zero and their
  MLP output dropped: their hidden states come out of the layer unchanged.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models import attention
from models.attention import FastPathUnsupported

MASK_INPUT = "cross_attention_mask"
# Processor outputs the vision tower reads (not the packed step).
VISION_INPUTS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")


@dataclass(slots=True)
class CrossRow:
    """The tokens `[start, start + length)` of the packed step read `num_states` vision states kept
    in the side `slots` (pool slot of each), each query through its row of `mask`
    ([1, 1, length, num_states], additive)."""

    start: int
    length: int
    slots: torch.Tensor
    num_states: int
    mask: torch.Tensor


@dataclass(slots=True)
class CrossStep:
    rows: list[CrossRow]
    num_tokens: int


def has_cross_attention(model) -> bool:
    config = model.config.get_text_config(decoder=True)
    return bool(getattr(config, "cross_attention_layers", None)) and _parts(model) is not None


def _parts(model):
    """(vision tower, projector, text model) of an Mllama-shaped model, or None."""
    inner = getattr(model, "model", model)
    parts = tuple(
        getattr(inner, name, None) for name in ("vision_model", "multi_modal_projector", "language_model")
    )
    return parts if all(part is not None for part in parts) else None


def side_tokens(config, mm_inputs: dict | None) -> int:
    """Side slots a prompt's images take in each layer's pool: the vision states of all
    cross-attention layers spread over all layers."""
    states = vision_states(config, mm_inputs)
    text = config.get_text_config(decoder=True)
    return -(-states * len(text.cross_attention_layers) // text.num_hidden_layers) if states else 0


def vision_states(config, mm_inputs: dict | None) -> int:
    """Vision states of a prompt's images: images x tiles x patches per tile (the class token
    included), as Mllama lays out its cross-attention cache."""
    pixels = (mm_inputs or {}).get("pixel_values")
    vision = getattr(config, "vision_config", None)
    text = config.get_text_config(decoder=True)
    if (
        pixels is None
        or vision is None
        or pixels.dim() != 6
        or not getattr(text, "cross_attention_layers", None)
    ):
        return 0
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    return pixels.shape[1] * pixels.shape[2] * patches


class CrossAttention:
    """Installs the paged forward on the model's cross-attention modules and prepares, per step,
    what they read."""

    def __init__(self, model, cache) -> None:
        self.model = model
        self.cache = cache
        self.vision, self.projector, self.text_model = _parts(model)
        self.layers = sorted(model.config.get_text_config(decoder=True).cross_attention_layers)
        self.modules = [self.text_model.layers[index].cross_attn for index in self.layers]
        for index, module in enumerate(self.modules):
            module._cross_index = index  # its vision states' place in the side slots
            if getattr(module, "_paged_cross", False):
                continue  # installed by an earlier runner of this model
            module._model_forward = module.forward
            module.forward = types.MethodType(_paged_cross_forward, module)
            module._paged_cross = True  # the self-test's mask watch leaves these to us
        # A decoding sequence's row reads the same side slots through the same mask row (its
        # prompt's last) at every step: kept per sequence, valid while its side blocks (a preempted
        # sequence gets new ones) and its prompt's mask tensor (held here, so its identity cannot
        # pass to another prompt's) are the same; dropped when the runner releases the sequence.
        self._decode_rows: dict[int, tuple] = {}

    @property
    def hidden_size(self) -> int:
        return self.text_model.config.hidden_size

    def fill(self, row, mm_inputs: dict) -> None:
        """Compute the row's vision states and write every cross-attention layer's keys and values
        of them into the side slots (laid out as the module docstring says)."""
        states = self.vision(**{name: mm_inputs[name] for name in VISION_INPUTS if name in mm_inputs})
        states = self.projector(states.last_hidden_state)
        states = states.reshape(1, -1, self.hidden_size)
        count = states.shape[1]
        slots = self._slots(row.side_blocks, states.device)
        for index, module in enumerate(self.modules):
            key = module.k_proj(states).view(1, count, module.num_key_value_heads, module.head_dim)
            value = module.v_proj(states).view(1, count, module.num_key_value_heads, module.head_dim)
            key = module.k_norm(key.transpose(1, 2))
            value = value.transpose(1, 2)
            keys, values = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [count, kv heads, D]
            done = 0
            for host, first, end in _pieces(index, count, slots.numel()):
                key_pool, value_pool = self.cache.layer(host, key, value)
                if key_pool.shape[2:] != keys.shape[1:] or value_pool.shape[2:] != values.shape[1:]:
                    raise FastPathUnsupported("cross-attention heads differ from the self-attention heads")
                taken = slots[first:end].to(key_pool.device)
                key_pool.view(-1, *key_pool.shape[2:]).index_copy_(0, taken, keys[done : done + end - first])
                value_pool.view(-1, *value_pool.shape[2:]).index_copy_(
                    0, taken, values[done : done + end - first]
                )
                done += end - first

    def _decoding(self, row):
        """(slots, states, mask, visible) kept for a decoding row, or None: built at its first
        decode step, reused while its side blocks and its prompt's mask stay the same."""
        if len(row.token_ids) != 1 or not row.side_blocks or row.inputs is None:
            return None
        kept = self._decode_rows.get(row.seq_id)
        if kept is None:
            return None
        full_mask, side_blocks, parts = kept
        same_prompt = full_mask is (row.inputs.mm_inputs or {}).get(MASK_INPUT)
        return parts if same_prompt and side_blocks == row.side_blocks else None

    def release(self, seq_ids) -> None:
        for seq_id in seq_ids:
            self._decode_rows.pop(seq_id, None)

    def _slots(self, side_blocks: list[int], device) -> torch.Tensor:
        """Pool slot of each side slot of a request."""
        size = self.cache.block_size
        blocks = torch.tensor(side_blocks, dtype=torch.long, device=device)
        return (blocks[:, None] * size + torch.arange(size, device=device)).reshape(-1)

    def step(self, rows, dtype: torch.dtype) -> tuple[CrossStep | None, dict]:
        """What this step's cross-attention layers read, and the model inputs that make the model
        run them (none when no row has images: the model then skips those layers, as it does for
        a text prompt)."""
        device = self.cache.device
        cross_rows, keep = [], []
        offset = 0
        for row in rows:
            length = len(row.token_ids)
            cached = self._decoding(row)
            if cached is not None:
                slots, count, additive, visible = cached
                cross_rows.append(CrossRow(offset, length, slots, count, additive))
                keep.append(visible)
                offset += length
                continue
            mask_rows = None
            if row.side_blocks and row.inputs is not None:
                full_mask = (row.inputs.mm_inputs or {}).get(MASK_INPUT)
                count = vision_states(self.model.config, row.inputs.mm_inputs)
                if full_mask is not None and count:
                    index = torch.arange(row.start, row.end, device=full_mask.device).clamp_(
                        max=full_mask.shape[1] - 1
                    )
                    mask_rows = full_mask[0, index]  # [length, images, tiles]
            if mask_rows is None:
                keep.append(torch.zeros(length, device=device, dtype=dtype))
            else:
                additive, visible = _additive_mask(mask_rows, count, dtype)
                slots = self._slots(row.side_blocks, device)
                cross_rows.append(CrossRow(offset, length, slots, count, additive[None, None]))
                keep.append(visible)
                if length == 1 and row.start >= full_mask.shape[1] - 1:
                    self._decode_rows[row.seq_id] = (
                        full_mask,
                        list(row.side_blocks),  # a copy, so that a change to the sequence's own list shows
                        (slots, count, additive[None, None], visible),
                    )
            offset += length
        if not cross_rows:
            return None, {}
        # The model turns this [1, T, 1, 1] mask into its `full_text_row_masked_out_mask` (which
        # scales each token's MLP output in the cross-attention layers); the attention mask it
        # also builds from it goes unused, `_paged_cross_forward` reads the rows' own.
        visible = torch.cat(keep).to(torch.long).view(1, -1, 1, 1)
        placeholder = torch.zeros(1, 1, self.hidden_size, device=device, dtype=dtype)
        inputs = {"cross_attention_states": placeholder, MASK_INPUT: visible}
        return CrossStep(cross_rows, offset), inputs


def _pieces(index: int, count: int, capacity: int) -> list[tuple[int, int, int]]:
    """Where cross-attention layer number `index` keeps its `count` states, in order: (layer whose
    pool holds them, first side slot, end side slot), with `capacity` side slots per layer."""
    pieces, first = [], index * count
    end = first + count
    while first < end:
        host, slot = divmod(first, capacity)
        take = min(capacity - slot, end - first)
        pieces.append((host, slot, slot + take))
        first += take
    return pieces


def _additive_mask(
    mask_rows: torch.Tensor, count: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """[q, images, tiles] mask rows -> ([q, count] additive mask, [q] rows that see something), as
    transformers' `_prepare_cross_attention_mask` builds them: a row that allows no tile gets an
    all-zero mask (it attends evenly) and is dropped after the MLP."""
    q = mask_rows.shape[0]
    per_state = mask_rows.reshape(q, -1).repeat_interleave(count // mask_rows[0].numel(), dim=-1)
    minimum = torch.finfo(dtype).min
    additive = (1.0 - per_state.to(dtype)).masked_fill(per_state == 0, minimum)
    visible = (additive != minimum).any(dim=-1).to(dtype)
    return additive * visible[:, None], visible


def _paged_cross_forward(self, hidden_states, *args, **kwargs):
    """MllamaTextCrossAttention.forward over a packed step: queries of every row, keys and values
    from each row's side blocks (`CrossStep`); rows without images get zeros. Outside a paged
    step (the self-test's reference, the generic path) the model's own forward runs."""
    layout = attention.current_layout()
    if layout is None or layout.cross is None:
        return self._model_forward(hidden_states, *args, **kwargs)
    step: CrossStep = layout.cross
    _, length, _ = hidden_states.shape
    query = self.q_proj(hidden_states).view(1, length, self.num_heads, self.head_dim).transpose(1, 2)
    query = self.q_norm(query)
    out = query.new_zeros(1, self.num_heads, length, self.head_dim)
    for row in step.rows:
        keys, values = [], []
        for host, first, end in _pieces(self._cross_index, row.num_states, row.slots.numel()):
            key_pool, value_pool = layout.cache.layer_pools(host)
            taken = row.slots[first:end].to(key_pool.device)
            # Pools of a replica spread over several GPUs live on their layers' devices.
            keys.append(key_pool.view(-1, *key_pool.shape[2:]).index_select(0, taken).to(query.device))
            values.append(value_pool.view(-1, *value_pool.shape[2:]).index_select(0, taken).to(query.device))
        key = torch.cat(keys).transpose(0, 1)  # [kv heads, states, D]
        value = torch.cat(values).transpose(0, 1)
        span = slice(row.start, row.start + row.length)
        out[:, :, span] = F.scaled_dot_product_attention(
            query[:, :, span],
            key[None],
            value[None],
            attn_mask=row.mask.to(query.device),
            scale=self.scaling if self.scaling is not None else 1 / math.sqrt(self.head_dim),
            enable_gqa=self.num_heads != key.shape[0],
        )
    out = out.transpose(1, 2).reshape(1, length, -1)
    return self.o_proj(out), None
