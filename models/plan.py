"""The step plan: what the scheduler asks a runner to compute in one forward pass. No tensors.

`scheduler.batch` builds it from its bookkeeping; a runner (`models.runner.PagedRunner` or
`models.generic.GenericRunner`) executes it and returns one `SampledToken` per sampler, in plan
order. Block ids index the replica's paged KV pool (`models.kv_cache`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple


@dataclass(frozen=True, slots=True)
class SequenceInputs:
    """What a runner needs of a sequence besides its token ids, built once when it arrives
    (`ModelReplica.sequence_inputs`); the scheduler carries it without looking inside."""

    mm_inputs: dict[str, Any] | None = None  # image inputs, fed with the chunk that covers the span
    # M-RoPE (Qwen-VL): [3, P] positions of the prompt's tokens; later tokens sit at their index
    # plus `mrope_delta` on all three axes.
    mrope_positions: Any = None
    mrope_delta: int = 0
    # Position ranges [first, end) of the prompt whose tokens attend to each other both ways.
    bidirectional: tuple[tuple[int, int], ...] = ()
    # KV slots the sequence needs besides its positions: the vision states its cross-attention
    # layers read (Mllama), kept in blocks of their own (`PlanRow.side_blocks`).
    side_tokens: int = 0


@dataclass(slots=True)
class PromptScoring:
    """Prompt logprobs a prefill chunk computes: the chunk's positions from `offset` on (chunk
    indices) predict `targets`, the prompt tokens that follow them. The runner fills `results`
    (one `models.sampling.TokenLogprob` per target, with `top` alternatives each)."""

    offset: int
    targets: list[int]
    top: int
    results: list[Any] = field(default_factory=list)


@dataclass(slots=True)
class PlanRow:
    """One sequence's work this step: feed `token_ids` at positions `start, start + 1, ...`.

    A row of one token whose keys already cover `start` positions is a decode row; anything else
    is a prefill chunk. `samplers` draw from the logits of the row's last position, in order (a
    completed prompt of an n > 1 request has the parent's sampler and its children's); empty when
    the chunk does not reach the end of the prompt.
    """

    seq_id: int
    token_ids: list[int]
    start: int
    block_table: list[int]  # physical blocks of positions [0, start + len(token_ids))
    samplers: list[Any] = field(default_factory=list)
    inputs: SequenceInputs | None = None
    with_images: bool = False  # the chunk covers the image tokens: feed `inputs.mm_inputs`
    seq_len: int = 0  # tokens the sequence holds now (prompt and generated), fed or not
    scoring: PromptScoring | None = None  # the request asked for prompt logprobs
    side_blocks: list[int] = field(default_factory=list)  # blocks of `inputs.side_tokens`

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)

    @property
    def mm_inputs(self) -> dict[str, Any] | None:
        return self.inputs.mm_inputs if self.with_images and self.inputs is not None else None


@dataclass(slots=True)
class StepPlan:
    rows: list[PlanRow] = field(default_factory=list)
    # (source block, destination block): copied after the forward. A forked choice of an n > 1
    # request shares its parent's full prompt blocks and gets a copy of the partial last one.
    copies: list[tuple[int, int]] = field(default_factory=list)
    # (parent seq, child seq) forked this step: runners that keep state per sequence copy it.
    forks: list[tuple[int, int]] = field(default_factory=list)
    # Sequences that left the batch (finished, cancelled, preempted) since the previous plan.
    released: list[int] = field(default_factory=list)
    # Blocks handed to a sequence for the first time since they were last used: the runner zeroes
    # them so that stale keys and values (even non-finite ones) can never reach a masked position.
    fresh_blocks: list[int] = field(default_factory=list)

    @property
    def num_samplers(self) -> int:
        return sum(len(row.samplers) for row in self.rows)

    @property
    def num_tokens(self) -> int:
        return sum(len(row.token_ids) for row in self.rows)


class SampledToken(NamedTuple):
    """What one sampler drew: the token id and its log-probabilities when the request asked for
    them. No token means the row failed alone: its logits were not finite, or `error` says why."""

    token_id: int | None
    logprob: Any = None
    error: str | None = None
