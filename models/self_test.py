"""Startup self-test: does the paged fast path compute what the model itself computes?

Probes run through `PagedRunner.forward` exactly as the executor drives it: a prompt prefilled in
two chunks that then decodes; a second prompt (text, or an image prompt for vision-language
models) that joins while the first decodes; and a third that finds the first one's full blocks in
the prefix cache and computes only the rest. Decoding feeds each prompt's own next tokens, so every
row has a reference in the model's own forward over the whole prompt. A model that disagrees, or
whose own attention is not causal self-attention, is served by the generic path instead.
"""

from __future__ import annotations

import logging

import torch

from models.attention import FastPathUnsupported
from models.plan import PlanRow

log = logging.getLogger(__name__)


class _Probe:
    """Stands in for a sequence: prefills `prefill_len` tokens of `ids`, then "decodes" the rest
    of `ids` (the reference has logits for every position)."""

    def __init__(self, ids: list[int], prefill_len: int, mm_inputs: dict | None, blocks: list[int]) -> None:
        self.ids = ids
        self.prefill_len = prefill_len
        self.mm_inputs = mm_inputs
        self.blocks = blocks
        self.num_cached = 0
        self.positions: list[int] = []  # position of each logits row received
        self.rows: list[torch.Tensor] = []

    def row(self, take: int) -> PlanRow:
        start = self.num_cached
        end = start + take
        produces_logits = end >= self.prefill_len
        mm = self.mm_inputs if start == 0 else None
        return PlanRow(
            id(self), self.ids[start:end], start, self.blocks, [self] if produces_logits else [], mm
        )

    @property
    def can_decode(self) -> bool:
        return self.prefill_len <= self.num_cached < len(self.ids)


def blocks_needed(prompt_len: int, joiner_len: int, block_size: int) -> int:
    return 2 * -(-prompt_len // block_size) + -(-joiner_len // block_size)


def run_self_test(
    runner, prompt_ids: list[int], joiner: tuple[list[int], dict | None] | None, *, dtype: torch.dtype
) -> str | None:
    """None when the fast path's logits agree with the model's own forward, else the reason the
    fast path cannot be used. `joiner`: token ids and model inputs (pixel values...) of the second
    prompt; by default a rotation of the first."""
    if len(prompt_ids) < 8:
        return "self-test prompt too short"
    reason = positions_problem(runner.model)
    if reason is not None:
        return reason
    if joiner is None:
        half = len(prompt_ids) // 2
        joiner = (prompt_ids[half:] + prompt_ids[:half], None)
    joiner_ids, joiner_mm = joiner
    block_size = runner.block_size
    if blocks_needed(len(prompt_ids), len(joiner_ids), block_size) > runner.num_blocks:
        return "the KV pool is too small for the self-test"
    counter = iter(range(runner.num_blocks))

    def blocks_for(count: int) -> list[int]:
        return [next(counter) for _ in range(-(-count // block_size))]

    first = _Probe(prompt_ids, len(prompt_ids) - 4, None, blocks_for(len(prompt_ids)))
    second = _Probe(joiner_ids, len(joiner_ids) - 2, joiner_mm, blocks_for(len(joiner_ids)))
    shared = (first.prefill_len - 1) // block_size
    third = _Probe(
        prompt_ids,
        first.prefill_len,
        None,
        first.blocks[:shared] + blocks_for(len(prompt_ids) - shared * block_size),
    )
    references = []
    try:
        for probe in (first, second):
            logits, reason = _reference_logits(runner, probe.ids, probe.mm_inputs, probe.prefill_len - 1)
            if reason is not None:
                return reason
            references.append(logits)
        half = first.prefill_len // 2
        _step(runner, [], [(first, half)])
        _step(runner, [], [(first, first.prefill_len - half)])
        if joiner_mm:  # image tokens come in one chunk
            _step(runner, [first], [(second, second.prefill_len)])
        else:
            half = second.prefill_len // 2
            _step(runner, [first], [(second, half)])
            _step(runner, [first], [(second, second.prefill_len - half)])
        if shared:
            third.num_cached = shared * block_size  # found in the prefix cache
            _step(
                runner,
                [p for p in (first, second) if p.can_decode],
                [(third, third.prefill_len - third.num_cached)],
            )
        probes = (first, second, third) if shared else (first, second)
        while any(p.can_decode for p in probes):
            _step(runner, [p for p in probes if p.can_decode], [])
    except FastPathUnsupported as exc:
        return str(exc)
    except Exception as exc:  # any model that cannot run packed steps takes the generic path
        log.debug("fast path self-test raised", exc_info=True)
        return f"{type(exc).__name__}: {exc}"
    references.append(references[0])  # the prefix-hit probe computes the first prompt again
    # References hold the rows from each probe's last prefill position on.
    expected = torch.cat(
        [
            ref[[pos - p.prefill_len + 1 for pos in p.positions]]
            for ref, p in zip(references, probes, strict=True)
        ]
    )
    actual = torch.stack([row for p in probes for row in p.rows])
    return compare_logits(expected, actual, dtype)


def _step(runner, decode: list[_Probe], prefill: list[tuple[_Probe, int]]) -> None:
    work = [(p, 1) for p in decode] + prefill
    rows = [probe.row(take) for probe, take in work]
    logits = runner.forward(rows)
    produced = iter(logits)
    for (probe, take), row in zip(work, rows, strict=True):
        probe.num_cached += take
        if row.samplers:
            probe.positions.append(row.end - 1)
            probe.rows.append(next(produced).float())


def _reference_logits(
    runner, prompt_ids: list[int], mm_inputs: dict | None, first_row: int
) -> tuple[torch.Tensor, str | None]:
    """The model's own forward over the whole prompt, with its own attention: the logits of
    positions `first_row` on (as fp32). Also watches the masks the model builds for its text
    decoder: one that lets a token see later tokens (bidirectional image or prefix attention) is
    something the causal fast path cannot reproduce, however close the logits happen to come."""
    model = runner.model
    config = model.config.get_text_config(decoder=True)
    seen: list[str] = []

    def watch(module, args, kwargs):
        problem = mask_problem(kwargs.get("attention_mask"))
        if problem and not seen:
            seen.append(f"{problem} in {type(module).__name__}")

    hooks = [
        module.register_forward_pre_hook(watch, with_kwargs=True)
        for module in model.modules()
        if getattr(module, "config", None) is config and hasattr(module, "layer_idx")
    ]
    fast = config._attn_implementation
    config._attn_implementation = runner.original_attn
    try:
        out = model(
            input_ids=torch.tensor([prompt_ids], device=runner.device), use_cache=False, **(mm_inputs or {})
        )
    finally:
        config._attn_implementation = fast
        for hook in hooks:
            hook.remove()
    reason = f"the model's own attention is not causal self-attention: {seen[0]}" if seen else None
    return out.logits[0, first_row:].float(), reason


def positions_problem(model) -> str | None:
    """Qwen2-VL and kin place image tokens on a 3-D grid (M-RoPE) computed by the model itself from
    the whole prompt; the fast path's positions are 1-D."""
    if any(callable(getattr(m, "get_rope_index", None)) for m in (model, getattr(model, "model", None))):
        return "the model computes its own multimodal position ids (M-RoPE)"
    return None


def mask_problem(mask) -> str | None:
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


def compare_logits(expected: torch.Tensor, actual: torch.Tensor, dtype: torch.dtype) -> str | None:
    """`expected`/`actual`: [rows, vocab]. fp32 agrees to rounding (about 1e-6 relative on the tiny
    models); half precision only to a cosine, and the fast path's top token must be the reference's,
    or tie with it within rounding."""
    if not torch.isfinite(actual).all():
        return "fast path produced non-finite logits"
    if dtype == torch.float32:
        scale = expected.abs().max().clamp(min=1.0)
        err = float((expected - actual).abs().max() / scale)
        return (
            None if err < 1e-4 else f"fast path logits differ from the reference (relative error {err:.2e})"
        )
    cos = torch.nn.functional.cosine_similarity(expected, actual, dim=-1).min()
    # How much lower the reference rates the fast path's choice than its own, against the spread of the row.
    gap = expected.max(-1).values - expected.gather(-1, actual.argmax(-1, keepdim=True)).squeeze(-1)
    same_top = bool((gap <= 0.05 * expected.std(-1)).all())
    if cos > 0.995 and same_top:
        return None
    return f"fast path logits differ from the reference (cosine {float(cos):.4f}, same top token: {same_top})"
