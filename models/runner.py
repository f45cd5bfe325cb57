"""The fast path: one packed forward per step over a per-slot KV cache.

A step feeds the model `[1, T]` tokens: one for every decoding row (in slot order), then the
prefill chunks of newcomers. `logits_to_keep` limits the LM head to the rows that sample this step.
Each row then samples with its own parameters. The scheduler decides who is in a step; this class
only runs it, so it holds no queueing logic.
"""

from __future__ import annotations

import logging
from typing import Sequence as Seq

import torch

from models import attention
from models.attention import FastPathUnsupported, Segment, StepLayout
from models.kv_cache import SlotKVCache
from models.sampling import sample
from models.sequence import Sequence

log = logging.getLogger(__name__)


class SlotRunner:
    """Runs steps for up to `num_slots` concurrent sequences of one model replica."""

    kind = "fast"

    def __init__(
        self, model, *, num_slots: int, max_seq_len: int, device: torch.device, cache_budget_bytes: int | None = None
    ) -> None:
        self.model = model
        self.device = device
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        text_config = model.config.get_text_config(decoder=True)
        self.cache = SlotKVCache(
            num_slots, max_seq_len, device, bytes_per_token=_kv_bytes_per_token(text_config, model.dtype), budget_bytes=cache_budget_bytes
        )
        self._by_slot: list[Sequence] = []  # active sequences, index == slot
        self._text_config = text_config
        self._original_attn = text_config._attn_implementation or "sdpa"
        attention.register()
        text_config._slot_fallback_attn = self._original_attn
        text_config._attn_implementation = attention.ATTENTION_NAME

    # -- slots ---------------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return self.num_slots - len(self._by_slot)

    @property
    def num_active(self) -> int:
        return len(self._by_slot)

    def can_admit(self, seq: Sequence, rows: int = 1) -> bool:
        """Whether `rows` more sequences like `seq` fit the cache budget at their worst case
        (prompt plus max_tokens), next to the worst case of everything already running."""
        if self.free_slots < rows:
            return False
        worst = max((s.num_prompt_tokens + s.max_tokens for s in self._by_slot), default=0)
        return self.cache.fits(self.num_active + rows, max(worst, seq.num_prompt_tokens + seq.max_tokens))

    def fits_alone(self, length: int, rows: int = 1) -> bool:
        return self.cache.fits(rows, length)

    def admit(self, seq: Sequence) -> None:
        if not self.free_slots:
            raise RuntimeError("no free slot")
        seq.slot = len(self._by_slot)
        self._by_slot.append(seq)

    @torch.inference_mode()
    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Give `child` a slot holding a copy of `parent`'s cached prompt (n > 1 shares one prefill)."""
        self.admit(child)
        self.cache.move(parent.slot, child.slot, parent.num_cached)
        child.num_cached = parent.num_cached

    @torch.inference_mode()
    def release(self, seq: Sequence) -> None:
        """Free the slot; the last active slot moves into the hole so active slots stay dense."""
        slot = seq.slot
        if slot is None:
            return
        seq.slot = None
        last = self._by_slot.pop()
        if last is not seq:
            self.cache.move(last.slot, slot, last.num_cached)
            last.slot = slot
            self._by_slot[slot] = last
        if not self._by_slot:
            self.cache.release_memory()

    # -- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, decode: Seq[Sequence], prefill: Seq[tuple[Sequence, int]]) -> None:
        """Advance every sequence in `decode` by one token and every `(seq, n)` in `prefill` by
        `n` prompt tokens; sequences whose prompt completes sample their first token."""
        logits, samplers = self._forward(decode, prefill)
        for seq, _ in prefill:
            if not seq.is_prefilling:
                for child in seq.children:
                    self.fork(seq, child)
        if samplers:
            if any(len(group) > 1 for group in samplers):
                # Siblings share their parent's last prompt position: repeat that row for each.
                rows = torch.repeat_interleave(
                    torch.arange(len(samplers), device=logits.device),
                    torch.tensor([len(group) for group in samplers], device=logits.device),
                )
                logits = logits[rows]
            self._sample(logits, [seq for group in samplers for seq in group])

    def _forward(self, decode, prefill) -> tuple[torch.Tensor, list[list[Sequence]]]:
        """One packed forward: returns the logits of the rows that sample (decode rows in slot
        order, then prefills that complete) and, for each row, the sequences that sample from it.
        Advances `num_cached`; the self-test drives this same code with probes."""
        decode = sorted(decode, key=lambda s: s.slot)
        tokens: list[int] = [s.last_token for s in decode]
        positions: list[int] = [s.total_len - 1 for s in decode]
        keep: list[int] = list(range(len(decode)))
        samplers: list[list[Sequence]] = [[s] for s in decode]
        segments: list[Segment] = []
        mm_inputs: dict = {}
        for seq, n in prefill:
            start = len(tokens)
            chunk = seq.prompt_ids[seq.num_cached : seq.num_cached + n]
            tokens.extend(chunk)
            positions.extend(range(seq.num_cached, seq.num_cached + n))
            segments.append(Segment(seq.slot, start, n, seq.num_cached))
            if seq.mm_inputs and seq.num_cached == 0:
                mm_inputs.update(seq.mm_inputs)
            if seq.num_cached + n == len(seq.prompt_ids):
                keep.append(len(tokens) - 1)
                samplers.append([seq, *seq.children])

        layout = self._layout(
            [s.slot for s in decode], [s.total_len - 1 for s in decode], segments, max(positions) + 1
        )
        device = self.device
        out = self.model(
            input_ids=torch.tensor([tokens], dtype=torch.long, device=device),
            position_ids=torch.tensor([positions], dtype=torch.long, device=device),
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=device),
            use_cache=False,
            slot_layout=layout,
            **mm_inputs,
        )
        for seq in decode:
            seq.num_cached += 1
        for seq, n in prefill:
            seq.num_cached += n
        return out.logits[0], samplers

    def _layout(
        self, slots: list[int], positions: list[int], segments: list[Segment], needed_len: int
    ) -> StepLayout:
        """`slots`/`positions`: the decoding rows in slot order and the position each writes."""
        self.cache.reserve(len(self._by_slot), needed_len)
        device = self.device
        layout = StepLayout(cache=self.cache, segments=segments, num_active=len(self._by_slot))
        if slots:
            length = max(positions) + 1
            layout.num_decode = len(slots)
            layout.decode_slots = torch.tensor(slots, dtype=torch.long, device=device)
            layout.decode_positions = torch.tensor(positions, dtype=torch.long, device=device)
            layout.decode_is_dense = slots == list(range(layout.num_active))
            # Rows of slots that do not decode this step attend to position 0 only: their output
            # is discarded, the mask just keeps softmax finite.
            row_positions = torch.zeros(layout.num_active, dtype=torch.long, device=device)
            row_positions[layout.decode_slots] = layout.decode_positions
            keys = torch.arange(length, device=device)
            layout.decode_mask = (keys[None, :] <= row_positions[:, None])[:, None, None, :]
            layout.decode_len = length
        return layout

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        tokens, logprobs = sample(logits, [s.sampler for s in seqs])
        for seq, token, logprob in zip(seqs, tokens, logprobs):
            if token is None:
                log.warning("sequence %d produced non-finite logits; failing it alone", seq.seq_id)
                seq.abort("error", "the model produced invalid (non-finite) scores for this request")
            else:
                seq.append(token, logprob)

    # -- self-test -----------------------------------------------------------------------------
    @torch.inference_mode()
    def self_test(
        self,
        prompt_ids: list[int],
        joiner: tuple[list[int], dict | None] | None = None,
        *,
        dtype: torch.dtype,
    ) -> str | None:
        """Compare the fast path with the model's own forward, the way the executor runs it: `prompt_ids`
        is prefilled in two chunks and decodes; meanwhile a second prompt (`joiner`: token ids and
        model inputs such as pixel values; by default a rotation of the first) is prefilled in the same
        steps as those decodes (whole when it has model inputs, else in two chunks), then both decode.
        Decoding feeds the prompts' own next tokens, so every row has a reference. Returns None when
        the logits agree, else the reason the fast path cannot be used."""
        if len(prompt_ids) < 8:
            return "self-test prompt too short"
        reason = _positions_problem(self.model)
        if reason is not None:
            return reason
        if joiner is None:
            half = len(prompt_ids) // 2
            joiner = (prompt_ids[half:] + prompt_ids[:half], None)
        joiner_ids, joiner_mm = joiner
        first = _Probe(prompt_ids, len(prompt_ids) - 4, None)
        second = _Probe(joiner_ids, len(joiner_ids) - 2, joiner_mm)
        references = []
        try:
            for probe in (first, second):
                logits, reason = self._reference_logits(probe.ids, probe.mm_inputs, probe.prefill_len - 1)
                if reason is not None:
                    return reason
                references.append(logits)
            self.admit(first)
            self.admit(second)
            half = first.prefill_len // 2
            self._probe_step([], [(first, half)])
            self._probe_step([], [(first, first.prefill_len - half)])
            if joiner_mm:  # image tokens cannot be split across chunks
                self._probe_step([first], [(second, second.prefill_len)])
            else:
                half = second.prefill_len // 2
                self._probe_step([first], [(second, half)])
                self._probe_step([first], [(second, second.prefill_len - half)])
            while any(p.can_decode for p in (first, second)):
                self._probe_step([p for p in (first, second) if p.can_decode], [])
        except FastPathUnsupported as exc:
            return str(exc)
        except Exception as exc:  # any model that cannot run packed steps takes the generic path
            log.debug("fast path self-test raised", exc_info=True)
            return f"{type(exc).__name__}: {exc}"
        finally:
            self.release(second)
            self.release(first)
        # References hold the rows from each probe's last prefill position on.
        expected = torch.cat(
            [ref[[pos - p.prefill_len + 1 for pos in p.positions]] for ref, p in zip(references, (first, second))]
        )
        actual = torch.stack([row for p in (first, second) for row in p.rows])
        return _compare(expected, actual, dtype)

    def _probe_step(self, decode: list["_Probe"], prefill: list[tuple["_Probe", int]]) -> None:
        logits, samplers = self._forward(decode, prefill)
        for row, (probe,) in zip(logits, samplers):
            probe.positions.append(probe.num_cached - 1)
            probe.rows.append(row.float())

    def _reference_logits(
        self, prompt_ids: list[int], mm_inputs: dict | None, first_row: int
    ) -> tuple[torch.Tensor, str | None]:
        """The model's own forward over the whole prompt, with its own attention: the logits of
        positions `first_row` on (as fp32). Also watches the masks the model builds for its text
        decoder: one that lets a token see later tokens (bidirectional image or prefix attention) is
        something the causal fast path cannot reproduce, however close the logits happen to come."""
        config = self._text_config
        seen: list[str] = []

        def watch(module, args, kwargs):
            problem = _mask_problem(kwargs.get("attention_mask"))
            if problem and not seen:
                seen.append(f"{problem} in {type(module).__name__}")

        hooks = [
            module.register_forward_pre_hook(watch, with_kwargs=True)
            for module in self.model.modules()
            if getattr(module, "config", None) is config and hasattr(module, "layer_idx")
        ]
        config._attn_implementation = self._original_attn
        try:
            out = self.model(input_ids=torch.tensor([prompt_ids], device=self.device), use_cache=False, **(mm_inputs or {}))
        finally:
            config._attn_implementation = attention.ATTENTION_NAME
            for hook in hooks:
                hook.remove()
        reason = None
        if seen:
            reason = f"the model's own attention is not causal self-attention: {seen[0]}"
        return out.logits[0, first_row:].float(), reason

    def restore_attention(self) -> None:
        """Give the model back its own attention (when the generic path takes over)."""
        self._text_config._attn_implementation = self._original_attn


class _Probe:
    """Stands in for a Sequence during the self-test: prefills `prefill_len` tokens of `ids`, then
    "decodes" the rest of `ids` (the reference has logits for every position)."""

    def __init__(self, ids: list[int], prefill_len: int, mm_inputs: dict | None) -> None:
        self.ids = ids
        self.prefill_len = prefill_len
        self.prompt_ids = ids[:prefill_len]
        self.mm_inputs = mm_inputs
        self.num_cached = 0
        self.slot = None
        self.children: list = []
        self.positions: list[int] = []  # position of each logits row received
        self.rows: list[torch.Tensor] = []

    @property
    def last_token(self) -> int:
        return self.ids[self.num_cached]

    @property
    def total_len(self) -> int:
        return self.num_cached + 1

    @property
    def is_prefilling(self) -> bool:
        return self.num_cached < self.prefill_len

    @property
    def can_decode(self) -> bool:
        return self.prefill_len <= self.num_cached < len(self.ids)


def _positions_problem(model) -> str | None:
    """Qwen2-VL and kin place image tokens on a 3-D grid (M-RoPE) computed by the model itself from
    the whole prompt; the fast path's positions are 1-D."""
    if any(callable(getattr(m, "get_rope_index", None)) for m in (model, getattr(model, "model", None))):
        return "the model computes its own multimodal position ids (M-RoPE)"
    return None


def _mask_problem(mask) -> str | None:
    """What a 4-D attention mask (bool, or additive float) built by the model does that the causal
    fast path cannot: let a query see later tokens, or attend to keys that are not the prompt's own.
    The reference forward runs without a cache, so self-attention keys are exactly the queries."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return None
    q, k = mask.shape[-2:]
    if q != k:
        return "cross-attention"
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if bool(allowed.triu(1).any()):
        return "tokens attend to later tokens (bidirectional image or prefix attention)"
    return None


def _compare(expected: torch.Tensor, actual: torch.Tensor, dtype: torch.dtype) -> str | None:
    """`expected`/`actual`: [rows, vocab]. fp32 agrees to rounding (about 1e-6 relative on the tiny
    models); half precision only to a cosine, and the fast path's top token must be the reference's,
    or tie with it within rounding."""
    if not torch.isfinite(actual).all():
        return "fast path produced non-finite logits"
    if dtype == torch.float32:
        scale = expected.abs().max().clamp(min=1.0)
        err = float((expected - actual).abs().max() / scale)
        return None if err < 1e-4 else f"fast path logits differ from the reference (relative error {err:.2e})"
    cos = torch.nn.functional.cosine_similarity(expected, actual, dim=-1).min()
    # How much lower the reference rates the fast path's choice than its own, against the spread of the row.
    gap = expected.max(-1).values - expected.gather(-1, actual.argmax(-1, keepdim=True)).squeeze(-1)
    same_top = bool((gap <= 0.05 * expected.std(-1)).all())
    if cos > 0.995 and same_top:
        return None
    return f"fast path logits differ from the reference (cosine {float(cos):.4f}, same top token: {same_top})"


def _kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Keys and values of one position across all layers, from the config (an estimate for exotic
    layouts; the cache budget keeps a margin)."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 1)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    head_dim = getattr(config, "head_dim", None) or hidden // max(heads, 1)
    return 2 * layers * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
