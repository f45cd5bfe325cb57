"""The fast path: executes a step plan as one packed forward over the paged KV pool.

A step feeds the model `[1, T]` tokens: the decode rows first (one token each), then the prefill
chunks. `logits_to_keep` limits the LM head to the rows that sample. Each sampler then draws with
its own parameters. What goes into a step is decided by `scheduler.batch`; this class executes it.
"""

from __future__ import annotations

import logging
import time

import torch

from models import attention, cpu_attention, falcon
from models.arch import traits_of
from models.attention import DecodeGroup, PagedLayout, PrefillSegment, layer_rules
from models.cross_attention import CrossAttention, has_cross_attention
from models.flash_paged import FlashMetadata
from models.graphs import DecodeGraphs
from models.kv_cache import PagedKVCache
from models.plan import PlanRow, SampledToken, StepPlan
from models.rope import LongRopeRows
from models.sampling import draw, score_prompts

log = logging.getLogger(__name__)
# Inputs the processor returns for the model's own mask and position builders; the fast path
# computes both itself (from SequenceInputs), and their [1, P] shapes do not fit a packed step.
_STEP_OWNED_INPUTS = ("token_type_ids", "mm_token_type_ids")
# Decode rows whose tables differ by at most this many blocks share one gather even when the
# longer is more than twice the shorter: a handful of padding blocks costs less than another SDPA.
_GROUP_SLACK_BLOCKS = 8


class PagedRunner:
    """Runs steps of one model replica over a pool of `num_blocks` KV blocks."""

    kind = "fast"
    chunked_prefill = True
    prefix_caching = True
    scores_prompts = True  # prompt logprobs: rows may keep the logits of their prompt positions

    def __init__(
        self,
        model,
        *,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        use_flash: bool = False,
        decode_graphs: str = "off",
        max_batch: int = 32,
        max_seq_len: int = 4096,
    ) -> None:
        self.model = model
        self.device = device
        self.cache = PagedKVCache(num_blocks, block_size, device)
        self.last_split: dict[str, float] = {}  # seconds of the last step's forward and sampling
        # Decode-only steps without the model's modules (`models.lean_decode`), where installed.
        self.lean = None
        self.observing: dict | None = None  # set around a step to record its attention calls
        text_config = model.config.get_text_config(decoder=True)
        self._text_config = text_config
        self.rules = layer_rules(text_config)
        self.traits = traits_of(model.config)
        self.long_rope = LongRopeRows(model)
        # A sequence longer than this uses LongRoPE's long factors (None: no LongRoPE).
        self.long_rope_after = self.long_rope.threshold
        has_sinks = any(hasattr(m, "sinks") for m in model.modules())
        chunked = any(rule.chunk is not None for rule in self.rules.values())
        # Falcon's attention bypasses the AttentionInterface: it gets a forward that calls ours.
        alibi = falcon.install(model) is not None
        # FlashAttention's paged kernel is causal (optionally windowed) only: chunks, sinks, spans
        # that attend both ways and Falcon's ALiBi (its products rounded in bfloat16, which
        # FlashAttention's own ALiBi does not do) go through the gathered-blocks path.
        self.use_flash = use_flash and not (has_sinks or chunked or self.traits.bidirectional or alibi)
        # Decode rows through the compiled kernel where it is built (CPU); the self-test turns it
        # off for a model it does not reproduce (`models.replica`).
        self.in_place_decode = device.type == "cpu" and cpu_attention.kernel() is not None
        current = text_config._attn_implementation or "sdpa"
        # A model a runner already converted keeps the attention it had before that one.
        self.original_attn = (
            getattr(text_config, "_paged_fallback_attn", "sdpa")
            if current == attention.ATTENTION_NAME
            else current
        )
        attention.register()
        text_config._paged_fallback_attn = self.original_attn
        # Mllama: cross-attention layers read each request's vision states from its side blocks.
        self.cross = CrossAttention(model, self.cache) if has_cross_attention(model) else None
        self._placeholders = _placeholder_ids(model.config) if self.cross is None else frozenset()
        text_config._attn_implementation = attention.ATTENTION_NAME
        # "capture": CUDA graphs for decode steps; "static": their padded buffers without capture
        # (what CPU tests check); "off": every step eager.
        self._graphs_asked = decode_graphs in ("capture", "static")
        self.graphs = (
            DecodeGraphs(
                self, max_batch=max_batch, max_seq_len=max_seq_len, capture=decode_graphs == "capture"
            )
            if decode_graphs in ("capture", "static") and self.cross is None
            else None
        )

    @property
    def num_blocks(self) -> int:
        return self.cache.num_blocks

    @property
    def block_size(self) -> int:
        return self.cache.block_size

    @property
    def backend(self) -> str:
        if self.use_flash:
            return "flash_attention_2 (paged)"
        if self.in_place_decode:
            # fp32 pools and plain, windowed or chunked layers; the rest falls back per layer.
            return "decode rows: compiled kernel over the pool in place; prefill: sdpa"
        return "sdpa over gathered blocks"

    # -- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> list[SampledToken]:
        """Zero the blocks handed out fresh, run the forward, copy forked blocks, sample."""
        if plan.released:
            self.release(plan.released)
        if plan.fresh_blocks and self.cache.is_allocated:
            self.cache.zero_blocks(torch.tensor(plan.fresh_blocks, dtype=torch.long, device=self.device))
        if not plan.rows:
            return []
        started = time.perf_counter()
        logits = self.forward(plan.rows)
        if plan.copies:
            sources, destinations = zip(*plan.copies, strict=True)
            self.cache.copy_blocks(
                torch.tensor(sources, dtype=torch.long, device=self.device),
                torch.tensor(destinations, dtype=torch.long, device=self.device),
            )
        forwarded = time.perf_counter()
        if any(row.scoring is not None for row in plan.rows):
            logits = score_prompts(logits, plan.rows)
        drawn = draw(logits, plan.rows)
        # On a GPU the forward is only queued when `forwarded` is read: sampling's first read of
        # the logits waits for it, so there `sample` includes the device time.
        self.last_split = {"forward": forwarded - started, "sample": time.perf_counter() - forwarded}
        return drawn

    @property
    def graphs_status(self) -> str:
        if self.graphs is None:
            # Cross-attention steps gather per-request vision states of varying length: not captured.
            return "off (cross-attention)" if self.cross is not None and self._graphs_asked else "off"
        return self.graphs.status

    def forward(self, rows: list[PlanRow]) -> torch.Tensor:
        """One forward over `rows`; returns the logits `[R, vocab]` of the last position of each
        row that has samplers, in order, each preceded by the positions the row scores (prompt
        logprobs) when it asked. The self-test drives this same code with probes."""
        if self.graphs is not None and self.graphs.applicable(rows):
            return self.graphs.forward(rows)
        if self._placeholders and (apart := self._image_rows_apart(rows)) is not None:
            return apart
        return self.forward_eager(rows)

    def _image_rows_apart(self, rows: list[PlanRow]) -> torch.Tensor | None:
        """A model puts image features where the step's input ids hold its image placeholder, and
        checks that their counts agree over the whole packed step: a row without images holding
        that token (typed into a raw prompt, or generated) beside a row with images made the step
        fail, and every row was computed again alone. Such a step runs as two forwards, the rows
        with images and the others; the logits come back in row order."""
        with_images = [i for i, row in enumerate(rows) if row.mm_inputs]
        if not with_images or len(with_images) == len(rows):
            return None
        placeholders = self._placeholders
        others = [i for i, row in enumerate(rows) if not row.mm_inputs]
        if not any(token in placeholders for i in others for token in rows[i].token_ids):
            return None
        by_row: dict[int, torch.Tensor] = {}
        for group in (with_images, others):
            logits = self.forward([rows[i] for i in group])
            offset = 0
            for i in group:
                kept = (len(rows[i].scoring.targets) if rows[i].scoring is not None else 0) + bool(
                    rows[i].samplers
                )
                by_row[i] = logits[offset : offset + kept]
                offset += kept
        return torch.cat([by_row[i] for i in range(len(rows))])

    def forward_eager(self, rows: list[PlanRow]) -> torch.Tensor:
        """One packed forward over `rows`, built for this step's shapes."""
        block_size = self.cache.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        keep: list[int] = []
        mm_inputs: list[dict] = []
        for row in rows:
            table = row.block_table
            tokens.extend(row.token_ids)
            span = range(row.start, row.end)
            positions.extend(span)
            slots.extend(table[p // block_size] * block_size + p % block_size for p in span)
            if row.scoring is not None:
                first = len(tokens) - len(row.token_ids) + row.scoring.offset
                keep.extend(range(first, first + len(row.scoring.targets)))
            if row.samplers:
                keep.append(len(tokens) - 1)
            if row.mm_inputs:
                if self.cross is not None:
                    if row.side_blocks:  # no side slots: nothing for cross-attention to read
                        self.cross.fill(row, row.mm_inputs)
                else:
                    mm_inputs.append(row.mm_inputs)
        device = self.device
        position_tensor = torch.tensor(positions, dtype=torch.long, device=device)
        layout = self._layout(rows, slots, position_tensor)
        model_inputs = _merge_model_inputs(mm_inputs)
        if self.cross is not None:
            layout.cross, model_inputs = self.cross.step(rows, self.model.dtype)
        input_ids = torch.tensor(tokens, dtype=torch.long, device=device)
        position_ids = self._position_ids(rows, position_tensor)
        lean = (
            self.lean is not None
            and layout.num_decode == len(tokens) == len(keep)
            and not model_inputs
            and position_ids.dim() == 2
        )
        with attention.use_layout(layout), self.long_rope.rows(self._long_rope_flags(rows)):
            if lean:
                return self.lean.forward(input_ids, position_ids, layout)
            out = self.model(
                input_ids=input_ids[None],
                position_ids=position_ids,
                logits_to_keep=torch.tensor(keep or [len(tokens) - 1], dtype=torch.long, device=device),
                use_cache=False,
                **model_inputs,
            )
        return out.logits[0] if keep else out.logits[0, :0]

    def _position_ids(self, rows: list[PlanRow], positions: torch.Tensor) -> torch.Tensor:
        """What the model's rotary embedding reads: `[1, T]` positions (shifted for models that
        count from 1), or `[3, 1, T]` M-RoPE positions when a row carries them: later tokens at
        their index plus the prompt's offset on all three axes (one tensor op for the whole step),
        prompt tokens copied from the table the model built (prefill chunks only)."""
        tables = [row.inputs.mrope_positions if row.inputs is not None else None for row in rows]
        if all(table is None for table in tables):
            return (positions + self.traits.position_offset)[None]
        deltas: list[int] = []
        for row, table in zip(rows, tables, strict=True):
            deltas.extend([row.inputs.mrope_delta if table is not None else 0] * len(row.token_ids))
        out = (positions + positions.new_tensor(deltas)).expand(3, -1).clone()
        offset = 0
        for row, table in zip(rows, tables, strict=True):
            if table is not None and row.start < table.shape[1]:
                end = min(row.end, table.shape[1])
                out[:, offset : offset + end - row.start] = table[:, row.start : end].to(out.device)
            offset += len(row.token_ids)
        return out[:, None]

    def _long_rope_flags(self, rows: list[PlanRow]) -> torch.Tensor | bool | None:
        """Per token, whether its sequence is past the LongRoPE threshold (None: no LongRoPE)."""
        threshold = self.long_rope_after
        if threshold is None:
            return None
        flags = [row.seq_len > threshold for row in rows]
        if all(flags) or not any(flags):
            return flags[0]
        per_token = [flag for row, flag in zip(rows, flags, strict=True) for _ in row.token_ids]
        return torch.tensor(per_token, dtype=torch.bool, device=self.device)

    def _layout(self, rows: list[PlanRow], slots: list[int], positions: torch.Tensor) -> PagedLayout:
        device = self.device
        layout = PagedLayout(
            self.cache,
            torch.tensor(slots, dtype=torch.long, device=device),
            positions,
            rules=self.rules,
            declared_spans=self.traits.bidirectional is not None,
            in_place_decode=self.in_place_decode,
            observed=self.observing,
        )
        if self.use_flash:
            layout.flash = self._flash_metadata(rows)
            return layout
        block_size = self.cache.block_size
        num_decode = 0
        while num_decode < len(rows) and len(rows[num_decode].token_ids) == 1:
            num_decode += 1
        if num_decode:
            layout.num_decode = num_decode
            layout.decode_groups = self._decode_groups(rows[:num_decode])
        start = num_decode
        for row in rows[num_decode:]:
            blocks = None
            if row.start:
                blocks = torch.tensor(
                    row.block_table[: -(-row.end // block_size)], dtype=torch.long, device=device
                )
            layout.segments.append(
                PrefillSegment(start, len(row.token_ids), row.start, blocks, _spans_within(row))
            )
            start += len(row.token_ids)
        return layout

    def _decode_groups(self, decode: list[PlanRow]) -> list[DecodeGroup]:
        """Decode rows grouped by length so that a long context in the batch does not pad every
        short row to its length: in a group, the longest table is at most twice the shortest (or
        a few blocks longer)."""
        block_size, null, device = self.cache.block_size, self.cache.null_block, self.device
        widths = [-(-row.end // block_size) for row in decode]
        if max(widths) <= max(2 * min(widths), min(widths) + _GROUP_SLACK_BLOCKS):
            members = [list(range(len(decode)))]
        else:
            order = sorted(range(len(decode)), key=widths.__getitem__)
            members = [[order[0]]]
            for index in order[1:]:
                first = widths[members[-1][0]]
                if widths[index] <= max(2 * first, first + _GROUP_SLACK_BLOCKS):
                    members[-1].append(index)
                else:
                    members.append([index])
        groups = []
        for member in members:
            width = max(widths[i] for i in member)
            tables = [decode[i].block_table[: widths[i]] + [null] * (width - widths[i]) for i in member]
            groups.append(
                DecodeGroup(
                    rows=None if len(members) == 1 else torch.tensor(member, dtype=torch.long, device=device),
                    blocks=torch.tensor(tables, dtype=torch.long, device=device),
                    positions=torch.tensor(
                        [decode[i].start for i in member], dtype=torch.long, device=device
                    ),
                )
            )
        return groups

    def _flash_metadata(self, rows: list[PlanRow]) -> FlashMetadata:
        block_size = self.cache.block_size
        query_lens = [len(row.token_ids) for row in rows]
        key_lens = [row.end for row in rows]
        widths = [-(-end // block_size) for end in key_lens]
        width = max(widths)
        tables = [row.block_table[:w] + [0] * (width - w) for row, w in zip(rows, widths, strict=True)]
        device = self.device

        def cumulative(values: list[int]) -> torch.Tensor:
            total, out = 0, [0]
            for value in values:
                total += value
                out.append(total)
            return torch.tensor(out, dtype=torch.int32, device=device)

        return FlashMetadata(
            cu_seqlens_q=cumulative(query_lens),
            cu_seqlens_k=cumulative(key_lens),
            max_seqlen_q=max(query_lens),
            max_seqlen_k=max(key_lens),
            block_table=torch.tensor(tables, dtype=torch.int32, device=device),
        )

    def release(self, seq_ids: list[int]) -> None:
        """Blocks are the scheduler's and the pool holds no per-sequence state; only what
        cross-attention keeps for decoding rows goes."""
        if self.cross is not None:
            self.cross.release(seq_ids)

    def restore_attention(self) -> None:
        """Give the model back its own attention (when the generic path takes over)."""
        self._text_config._attn_implementation = self.original_attn
        self.lean = None
        falcon.uninstall(self.model)


def _spans_within(row: PlanRow) -> tuple[tuple[int, int], ...]:
    """The row's bidirectional spans that end in its chunk. The batch never splits a span over
    two chunks, but a prefix-cache hit can start a chunk inside one: its queries then see the
    cached part of the span too (the prefix cache keys span blocks by the whole span's tokens)."""
    if row.inputs is None:
        return ()
    return tuple((a, b) for a, b in row.inputs.bidirectional if a < row.end and b > row.start)


def _merge_model_inputs(inputs: list[dict]) -> dict:
    """Image inputs of the rows in this step, concatenated along the image dimension in row order
    (the order their image tokens appear in the packed sequence)."""
    inputs = [{k: v for k, v in each.items() if k not in _STEP_OWNED_INPUTS} for each in inputs]
    inputs = [each for each in inputs if each]
    if not inputs:
        return {}
    if len(inputs) == 1:
        return inputs[0]
    merged = {}
    for name in inputs[0]:
        values = [each[name] for each in inputs]
        merged[name] = torch.cat(values) if isinstance(values[0], torch.Tensor) else values[0]
    return merged


def _placeholder_ids(config) -> frozenset[int]:
    """The token ids a vision-language model replaces with image or video features."""
    found: set[int] = set()
    for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= 0:
            found.add(value)
    return frozenset(found)
