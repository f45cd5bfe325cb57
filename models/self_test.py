"""Startup self-test: does the paged fast path compute what the model itself computes?

Probes run through `PagedRunner.forward` exactly as the executor drives it, several per step:

- a long text prompt (longer than every sliding window, attention chunk and LongRoPE threshold of
  the config, capped to keep startup fast) prefilled in three chunks;
- a short chat prompt built as requests build it (PaliGemma's prefix that attends both ways, for
  one) that joins while the long one is still prefilling;
- the long prompt again, finding its first blocks in the prefix cache;
- for vision-language models, two image prompts of different image sizes.

After its prompt, each probe feeds a few more tokens as decode rows. The reference is the model's
own forward with its own attention and cache, as `generate()` runs it: the prompt in one forward
with everything the processor returned, then one token at a time. A model that disagrees, or whose
own masks do something the fast path was not told about (cross-attention, tokens seeing later
tokens outside the declared spans), is served by the generic path instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from models.attention import FastPathUnsupported
from models.plan import PlanRow, SequenceInputs
from models.rope import rope_problem

log = logging.getLogger(__name__)
DECODE_TOKENS = 3


@dataclass
class ProbePrompt:
    """A prompt as the executor would hold it, and what the model's own forward takes for it."""

    ids: list[int]
    inputs: SequenceInputs | None = None  # what the fast path gets (as `ModelReplica.sequence_inputs`)
    model_inputs: dict | None = None  # what the reference forward gets besides the ids
    unsplit: tuple[int, int] | None = None  # positions computed in one chunk
    has_images: bool = False


@dataclass(eq=False)
class _Probe:
    prompt: ProbePrompt
    blocks: list[int]
    chunks: list[tuple[int, int]]  # prefill [start, end) per step
    start_step: int
    extra: list[int]  # tokens fed as decode rows after the prompt
    side_blocks: list[int] = field(default_factory=list)  # cross-attention states (Mllama)
    rows: list[torch.Tensor] = field(default_factory=list)  # logits received
    fed: int = 0  # decode tokens fed

    @property
    def ids(self) -> list[int]:
        return self.prompt.ids

    def next_row(self, step: int) -> PlanRow | None:
        if step < self.start_step:
            return None
        prompt = self.prompt
        if self.chunks:
            start, end = self.chunks[0]
            span = prompt.unsplit
            covers = prompt.has_images and span is not None and start <= span[0] and end > span[1]
            # Side slots are filled by the first row, as the batch plans it.
            covers = covers or bool(self.side_blocks and start == 0)
            return PlanRow(
                id(self),
                self.ids[start:end],
                start,
                self.blocks,
                [self] if end == len(self.ids) else [],
                inputs=prompt.inputs,
                with_images=covers,
                seq_len=len(self.ids),
                side_blocks=self.side_blocks,
            )
        if self.fed < len(self.extra):
            position = len(self.ids) + self.fed
            return PlanRow(
                id(self),
                [self.extra[self.fed]],
                position,
                self.blocks,
                [self],
                inputs=prompt.inputs,
                seq_len=position + 1,
                side_blocks=self.side_blocks,
            )
        return None

    def advance(self) -> None:
        if self.chunks:
            self.chunks.pop(0)
        else:
            self.fed += 1

    @property
    def done(self) -> bool:
        return not self.chunks and self.fed >= len(self.extra)


def blocks_needed(lengths: list[int], block_size: int, side_tokens: int = 0) -> int:
    """Blocks the probes of these prompt lengths take (the first is probed twice, as a prefix hit),
    plus `side_tokens` slots of cross-attention states over all of them."""
    per = [-(-(n + DECODE_TOKENS) // block_size) for n in lengths]
    return sum(per) + (per[0] if per else 0) + -(-side_tokens // block_size)


def run_self_test(runner, prompts: list[ProbePrompt], *, dtype: torch.dtype) -> str | None:
    """None when the fast path's logits agree with the model's own forward, else the reason the
    fast path cannot be used. `prompts[0]` is the long text prompt (probed again as a prefix-cache
    hit), the rest join one step after another."""
    for reason in (rope_problem(runner.model), positions_problem(runner.model)):
        if reason is not None:
            return reason
    if len(prompts[0].ids) < 8:
        return "self-test prompt too short"
    block_size = runner.block_size
    sides = [p.inputs.side_tokens if p.inputs is not None else 0 for p in prompts]
    if blocks_needed([len(p.ids) for p in prompts], block_size, sum(sides)) > runner.num_blocks:
        return "the KV pool is too small for the self-test"
    counter = iter(range(runner.num_blocks))

    def blocks_for(count: int) -> list[int]:
        return [next(counter) for _ in range(-(-count // block_size))]

    extra = prompts[0].ids[1 : 1 + DECODE_TOKENS]
    probes = []
    for index, (prompt, side) in enumerate(zip(prompts, sides, strict=True)):
        probes.append(
            _Probe(
                prompt,
                blocks_for(len(prompt.ids) + DECODE_TOKENS),
                _chunks(prompt, parts=3 if index == 0 else 2),
                start_step=index,
                extra=extra,
                side_blocks=blocks_for(side) if side else [],
            )
        )
    long = probes[0]
    shared = (len(long.ids) - 1) // block_size
    hit = _Probe(
        long.prompt,
        long.blocks[:shared] + blocks_for(len(long.ids) + DECODE_TOKENS - shared * block_size),
        [(shared * block_size, len(long.ids))],
        start_step=len(long.chunks) + 1,  # once the long prompt's blocks are written
        extra=extra,
    )
    probes.append(hit)
    try:
        references = []
        for probe in probes[:-1]:
            logits, reason = _reference_logits(runner, probe.prompt, extra)
            if reason is not None:
                return reason
            references.append(logits)
        references.append(references[0])  # the prefix hit computes the long prompt again
        step = 0
        while not all(p.done for p in probes):
            work = [(p, row) for p in probes if not p.done and (row := p.next_row(step)) is not None]
            # Decode rows first, as the batch orders them.
            work.sort(
                key=lambda item: not (len(item[1].token_ids) == 1 and item[1].start >= len(item[0].ids))
            )
            if work:
                logits = iter(runner.forward([row for _, row in work]))
                for probe, row in work:
                    if row.samplers:
                        probe.rows.append(next(logits).float())
                    probe.advance()
            step += 1
    except FastPathUnsupported as exc:
        return str(exc)
    except Exception as exc:  # any model that cannot run packed steps takes the generic path
        log.debug("fast path self-test raised", exc_info=True)
        # Said as a finding about the fast path, not as a bare exception that reads like a crash
        # (Mamba's output has no past_key_values; GLM-DSA's indexer needs a mask tensor).
        return (
            f"the self-test could not run the model on the fast path ({type(exc).__name__}: {str(exc)[:200]})"
        )
    finally:
        runner.release([id(probe) for probe in probes])
    expected = torch.cat(references)
    actual = torch.stack([row for p in probes for row in p.rows])
    return compare_logits(expected, actual, dtype)


def _chunks(prompt: ProbePrompt, parts: int) -> list[tuple[int, int]]:
    """Prefill chunks as the batch would cut them: a span computed in one chunk with everything
    after it; otherwise `parts` near-equal chunks."""
    length = len(prompt.ids)
    if prompt.unsplit is not None:
        first = prompt.unsplit[0]
        return [(0, first), (first, length)] if first else [(0, length)]
    size = -(-length // parts)
    return [(start, min(length, start + size)) for start in range(0, length, size)]


def _reference_logits(runner, prompt: ProbePrompt, extra: list[int]) -> tuple[torch.Tensor, str | None]:
    """The model's own forward with its own attention and cache, as generate() runs it: logits
    `[1 + len(extra), vocab]` (fp32) of the prompt's last position and of each extra token. Also
    watches the masks the model builds for its text decoder over the prompt."""
    model = runner.model
    config = model.config.get_text_config(decoder=True)
    seen: list[str] = []
    spans = prompt.inputs.bidirectional if prompt.inputs is not None else ()

    def watch(module, args, kwargs):
        problem = mask_problem(kwargs.get("attention_mask"), spans)
        if problem and not seen:
            seen.append(f"{problem} in {type(module).__name__}")

    hooks = [
        module.register_forward_pre_hook(watch, with_kwargs=True)
        for module in model.modules()
        if getattr(module, "config", None) is config
        and hasattr(module, "layer_idx")
        and not getattr(module, "_paged_cross", False)  # cross-attention the fast path computes
    ]
    fast = config._attn_implementation
    config._attn_implementation = runner.original_attn
    device = runner.device
    # M-RoPE models (GLM-4V, Qwen2-VL) keep the last prefill's position offset on their modules
    # and some read it on the next forward: a probe's reference must not start from another's.
    for module in model.modules():
        if getattr(module, "rope_deltas", None) is not None:
            module.rope_deltas = None
    try:
        out = model(
            input_ids=torch.tensor([prompt.ids], device=device), use_cache=True, **(prompt.model_inputs or {})
        )
        for hook in hooks:
            hook.remove()
        hooks = []
        rows = [out.logits[0, -1].float()]
        cache = out.past_key_values
        for token in extra:
            out = model(
                input_ids=torch.tensor([[token]], device=device),
                past_key_values=cache,
                use_cache=True,
                **_decode_inputs(prompt.model_inputs),
            )
            cache = out.past_key_values
            rows.append(out.logits[0, -1].float())
    finally:
        config._attn_implementation = fast
        for hook in hooks:
            hook.remove()
    reason = f"the model's own attention is not causal self-attention: {seen[0]}" if seen else None
    return torch.stack(rows), reason


def _decode_inputs(model_inputs: dict | None) -> dict:
    """What generate() feeds a decode step besides the token: Mllama's cross-attention mask row of
    the prompt's last token, repeated for each new one."""
    mask = (model_inputs or {}).get("cross_attention_mask")
    return {} if mask is None else {"cross_attention_mask": mask[:, -1:]}


def positions_problem(model) -> str | None:
    """Models that build their own multimodal position ids (M-RoPE) in a way `models.arch` does
    not know how to call: the fast path's positions would be 1-D."""
    from models.arch import rope_index_of

    has_own = any(
        callable(getattr(m, "get_rope_index", None)) for m in (model, getattr(model, "model", None))
    )
    if has_own and rope_index_of(model) is None:
        return "the model computes its own multimodal position ids (M-RoPE) with an unknown signature"
    return None


def mask_problem(mask, spans: tuple[tuple[int, int], ...] = ()) -> str | None:
    """What a 4-D attention mask (bool, or additive float) built by the model does that the fast
    path was not told: let a query see later tokens outside the prompt's declared bidirectional
    `spans`, or attend to keys that are not the prompt's own. The prompt forward runs with an
    empty cache, so self-attention keys are exactly the queries."""
    if isinstance(mask, dict):
        for each in mask.values():
            problem = mask_problem(each, spans)
            if problem:
                return problem
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return None
    q, k = mask.shape[-2:]
    if q != k:
        return "cross-attention"
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    later = allowed.triu(1).flatten(0, -3).any(0)  # [q, k]
    for first, end in spans:
        later[first:end, first:end] = False
    if bool(later.any()):
        return "tokens attend to later tokens (bidirectional attention the fast path was not told of)"
    return None


def compare_logits(expected: torch.Tensor, actual: torch.Tensor, dtype: torch.dtype) -> str | None:
    """`expected`/`actual`: [rows, vocab]. fp32 agrees to rounding (about 1e-6 relative on the tiny
    models); half precision only to a cosine, and the fast path's top token must be the reference's,
    or tie with it within rounding."""
    if expected.shape != actual.shape:
        return f"fast path produced {actual.shape[0]} logits rows, the reference {expected.shape[0]}"
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
