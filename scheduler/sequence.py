"""A sequence as the batch sees it: token ids, how many are cached, which KV blocks hold them.

Pure bookkeeping, no tensors. The sampler and the output state (detokenizer, stop rules) are
opaque handles the executor attaches; the batch only passes the sampler into step plans.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class PromptSpan:
    """Prompt positions `first`..`last` (inclusive) computed in one chunk: a prompt's image tokens
    (their inputs come whole; `has_images`) and tokens that attend to each other both ways. The
    digest stands for what the span's keys and values depend on besides the tokens before it
    (the pixel data, the span's own tokens): prefix-cache keys of blocks from `first` on include
    it, so two different images never share a block."""

    first: int
    last: int
    digest: bytes
    has_images: bool = True


class Sequence:
    """One choice of one request. `token_ids` is the prompt followed by the generated tokens;
    `num_cached` of them have keys and values in the blocks of `block_table`."""

    __slots__ = (
        "seq_id",
        "group",
        "index",
        "token_ids",
        "num_prompt_tokens",
        "max_tokens",
        "num_cached",
        "block_table",
        "block_keys",
        "pending_end",
        "pending_children",
        "last_progress",
        "is_running",
        "is_finished",
        "arrival",
        "sampler",
        "output",
        "span",
        "inputs",
        "cache_salt",
        "origin",
        "prompt_top",
        "scored_until",
        "side_tokens",
        "side_table",
        "side_filled",
        "_keys_cache",
    )

    def __init__(
        self,
        token_ids: list[int],
        *,
        max_tokens: int,
        arrival: float,
        group: Any = None,
        index: int = 0,
        sampler: Any = None,
        output: Any = None,
        span: PromptSpan | None = None,
        inputs: Any = None,
        origin: str = "",
        prompt_top: int | None = None,
        side_tokens: int = 0,
    ) -> None:
        self.seq_id = next(_ids)
        self.group = group  # the request this choice belongs to (opaque)
        self.index = index  # choice index within the request
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.max_tokens = max_tokens
        self.arrival = arrival  # earlier arrivals keep their blocks when memory runs out
        self.num_cached = 0
        self.block_table: list[int] = []
        self.block_keys: list[tuple] = []  # prefix-cache keys of the computed full blocks
        self.pending_end = 0  # full prompt blocks [len(block_keys), pending_end) are being computed
        # Further choices of an n > 1 request, not running yet: they fork from this sequence once
        # its prompt is computed and sample their first token from the same logits.
        self.pending_children: list[Sequence] = []
        self.last_progress = arrival  # when it last got tokens computed (or arrived): aging
        self.is_running = False
        self.is_finished = False
        self.sampler = sampler
        self.output = output
        self.span = span
        self.inputs = inputs  # what the runner needs besides token ids (opaque here)
        # Part of every prefix-cache key of the sequence: how its keys and values were computed
        # when that depends on more than its tokens (LongRoPE's short or long scaling).
        self.cache_salt: str | None = None
        # The client request it came from (the prompts of a multi-prompt completion share one):
        # admission takes turns between origins.
        self.origin = origin
        # Prompt logprobs: alternatives per prompt token (None: not asked), and the prompt tokens
        # [0, scored_until) whose logprobs were computed (the first has none, nothing predicts it).
        self.prompt_top = prompt_top
        self.scored_until = 1
        # KV slots the runner keeps for the sequence besides its positions (Mllama's
        # cross-attention keys and values of its images): blocks of `side_table`, taken with the
        # sequence's own, freed with them, shared by its choices. `side_filled`: written since they
        # were taken (a new table, after a preemption, is filled again from the inputs).
        self.side_tokens = side_tokens
        self.side_table: list[int] = []
        self.side_filled = False
        self._keys_cache: tuple[int, list[tuple]] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to feed: the rest of the prompt, or the one token sampled last step."""
        return len(self.token_ids) - self.num_cached

    @property
    def scores_prompt(self) -> bool:
        """Prompt logprobs still to compute: the prompt is computed from its first token, since a
        prefix-cache hit would skip the logits of the positions it covers (as vLLM does)."""
        return self.prompt_top is not None and self.scored_until < self.num_prompt_tokens

    @property
    def max_total_tokens(self) -> int:
        return self.num_prompt_tokens + self.max_tokens

    def priority(self) -> tuple[float, int]:
        """Lower is more important: arrival order, then choice order."""
        return (self.arrival, self.seq_id)

    def __repr__(self) -> str:
        state = "finished" if self.is_finished else "running" if self.is_running else "waiting"
        return f"Sequence({self.seq_id}, {state}, {self.num_cached}/{self.num_tokens} cached, blocks={self.block_table})"
