"""Per-row sampling for a batch: every row keeps its own parameters, penalties and RNG.

`sample()` takes the logits of the rows that produce a token this step (`[B, vocab]`) and one
`RowSampler` per row. Greedy rows take the argmax of the processed logits; sampled rows draw from
their own seeded `torch.Generator`, so a seeded row's draws do not depend on what else is batched
with it. The logits it draws from can (their last bits: logprobs differing in the third decimal were
seen on CPU under load), so a seeded sample repeats exactly under the same load and may part from its
solo run where tokens are nearly equally likely; greedy rows are batch-invariant (tested).
Log-probabilities are those of the model's distribution before any sampling transform.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from models.params import SamplingParams
from models.plan import PlanRow, PromptScoring, SampledToken

MAX_TOP_LOGPROBS = 20
_LOGIT_CAP = 1e30
# Prompt positions per log_softmax when scoring a prompt: the float32 copy stays this many rows
# of the vocabulary, however long the chunk.
_SCORE_PIECE = 128


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float | None  # None only for a prompt's first token, which nothing predicts
    top: list[tuple[int, float]]  # most likely alternatives, best first
    # Filled in by the sequence's detokenizer (replica thread), so the HTTP layer needs no tokenizer.
    token: str = ""
    top_tokens: list[str] | None = None
    # Each token's own UTF-8 bytes: not `token.encode()` for a token that holds part of a character.
    token_bytes: bytes | None = None
    top_token_bytes: list[bytes] | None = None
    rank: int | None = None  # prompt logprobs only: 1 + how many tokens were more likely


class RowSampler:
    """Sampling state of one sequence; lives as long as the sequence."""

    def __init__(
        self,
        params: SamplingParams,
        *,
        vocab_size: int,
        device: torch.device,
        prompt_ids: Sequence[int],
        eos_token_ids: frozenset[int],
        seed: int | None,
    ) -> None:
        self.params = params
        self.num_generated = 0
        self.constraint = None  # a models.grammar matcher when the request is constrained
        self.generator: torch.Generator | None = None
        if not params.is_greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed if seed is not None else torch.seed())
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.stop_ids = frozenset(stops)
        # Tokens to forbid while min_tokens is not reached (end-of-sequence and stop tokens).
        self._min_tokens_banned = sorted(set(eos_token_ids) | set(params.stop_token_ids))
        self._eos_ids = sorted(eos_token_ids)
        self._bias_ids = self._bias_values = None
        if params.logit_bias:
            self._bias_ids = torch.tensor(list(params.logit_bias.keys()), dtype=torch.long, device=device)
            self._bias_values = torch.tensor(
                list(params.logit_bias.values()), dtype=torch.float32, device=device
            )
        self._seen = self._counts = None
        if params.needs_penalties:
            self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if prompt_ids:
                self._seen[torch.tensor(list(prompt_ids), dtype=torch.long, device=device)] = True
            self._counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)

    def fork(self, seed: int | None) -> RowSampler:
        """A sibling for another choice of the same prompt (n > 1): same state, its own RNG."""
        twin = object.__new__(RowSampler)
        for name in (
            "params",
            "num_generated",
            "constraint",
            "stop_ids",
            "_min_tokens_banned",
            "_eos_ids",
            "_bias_ids",
            "_bias_values",
        ):
            setattr(twin, name, getattr(self, name))
        twin._seen = None if self._seen is None else self._seen.clone()
        twin._counts = None if self._counts is None else self._counts.clone()
        twin.generator = None
        if self.generator is not None:
            twin.generator = torch.Generator(device=self.generator.device)
            twin.generator.manual_seed(seed if seed is not None else torch.seed())
        if self.constraint is not None:
            twin.constraint = self.constraint.fork()
        return twin

    @property
    def needs_processing(self) -> bool:
        return (
            self._seen is not None
            or self._bias_ids is not None
            or self.constraint is not None
            or self.num_generated < self.params.min_tokens
        )

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalties, bias, min_tokens and grammar applied to one row `[vocab]` (in place)."""
        params = self.params
        if self._seen is not None:
            if params.repetition_penalty != 1.0:
                penalised = torch.where(
                    logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty
                )
                logits = torch.where(self._seen, penalised, logits)
            if params.frequency_penalty or params.presence_penalty:
                logits = logits - params.frequency_penalty * self._counts
                logits = logits - params.presence_penalty * (self._counts > 0).to(logits.dtype)
        if self._bias_ids is not None:
            logits = logits.index_add(0, self._bias_ids, self._bias_values)
        banned = self._min_tokens_banned if self.num_generated < params.min_tokens else None
        if self.constraint is None:
            if banned:
                logits[banned] = float("-inf")
            return logits
        if params.ignore_eos and not banned:
            banned = self._eos_ids  # with a grammar an end token would end it: kept out instead
        logits = self.constraint.mask_logits(logits)
        if banned:
            # Where the grammar allows nothing but an end (it is complete, or matches only ""),
            # the answer ends there: min_tokens and ignore_eos yield to it rather than leave no
            # token to sample (which failed the request with a 500).
            kept = logits.clone()
            kept[banned] = float("-inf")
            if bool(torch.isfinite(kept).any()):
                logits = kept
        return logits

    def accept(self, token_id: int) -> None:
        self.num_generated += 1
        if self._seen is not None:
            self._seen[token_id] = True
            self._counts[token_id] += 1
        if self.constraint is not None:
            self.constraint.advance(token_id)


# Top-k/top-p/min-p are applied to the this many most likely tokens when that is exact (the kept
# tokens all lie among them); sorting all 150k entries of a large vocabulary costs 10x more.
_CANDIDATES = 1024


def _sampling_distributions(
    logits: torch.Tensor, params: list[SamplingParams]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Temperature, top-k, top-p and min-p for the sampled rows `[S, vocab]`, batched. Returns
    unnormalised probabilities and the vocabulary ids their columns stand for (None: all of the
    vocabulary in natural order)."""
    vocab = logits.shape[-1]
    device = logits.device
    logits = logits / torch.tensor([p.temperature for p in params], device=device)[:, None]
    if not any(0 < p.top_k < vocab or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
        return torch.softmax(logits, dim=-1), None
    width = min(vocab, max(_CANDIDATES, *(p.top_k for p in params if 0 < p.top_k < vocab), 1))
    top_logits, order = torch.topk(logits, width, dim=-1)  # sorted, most likely first
    # True probabilities of the candidates (over the whole vocabulary) tell whether the filters
    # can be decided among them; rows where they cannot fall back to the full vocabulary.
    full = torch.exp(top_logits - torch.logsumexp(logits, dim=-1, keepdim=True))
    if width < vocab and not _candidates_suffice(full, params, vocab):
        top_logits, order = torch.sort(logits, dim=-1, descending=True)
        full = torch.softmax(top_logits, dim=-1)
        width = vocab
    top_k = torch.tensor([p.top_k if 0 < p.top_k < width else width for p in params], device=device)
    ranks = torch.arange(width, device=device)[None, :]
    # Rows with top_k renormalise over their k best (as `top_k` then `top_p` do elsewhere).
    probs = torch.where(
        (top_k < width)[:, None],
        torch.softmax(top_logits.masked_fill(ranks >= top_k[:, None], float("-inf")), dim=-1),
        full,
    )
    # Keep the smallest prefix whose mass reaches top_p (the token crossing it included); rows
    # with top_p = 1 keep everything (rounding in the cumulative sum must not cut their tail).
    top_p = torch.tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in params], device=device)
    drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p[:, None]
    drop[:, 0] = False  # the most likely token is always kept, whatever the filters say
    min_p = torch.tensor([p.min_p for p in params], device=device)
    drop |= probs < (min_p * probs[:, 0])[:, None]
    return probs.masked_fill(drop, 0.0), order


def _candidates_suffice(full: torch.Tensor, params: list[SamplingParams], vocab: int) -> bool:
    """Whether every row's kept tokens lie among the candidates `full` `[S, width]` (true
    probabilities, most likely first)."""
    width = full.shape[-1]
    mass = full.sum(dim=-1).tolist()
    last = full[:, -1].tolist()
    top = full[:, 0].tolist()
    for i, p in enumerate(params):
        if 0 < p.top_k <= width:
            continue
        if p.top_p < 1.0 and mass[i] >= p.top_p:
            continue
        if p.min_p > 0.0 and last[i] < p.min_p * top[i]:
            continue
        return False
    return True


def sample(
    logits: torch.Tensor, rows: Sequence[RowSampler]
) -> tuple[list[int | None], list[TokenLogprob | None]]:
    """One token per row. A row whose logits are not finite gets None (the caller fails that row
    alone) instead of poisoning the batch. Greedy rows are one argmax; sampled rows share one
    batched filter and each draws from its own generator."""
    logits = logits.float()
    # One pass instead of four (isnan, any, isposinf, any): a NaN or +inf anywhere in a row makes
    # its sum NaN or +inf (-inf alone, a masked token, does not). A sum can also overflow from
    # huge finite logits: such rows are checked exactly below, and are the only ones that are.
    row_sums = logits.sum(dim=-1)
    suspect = torch.isnan(row_sums) | torch.isposinf(row_sums)
    want_logprobs = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    raw_logprobs = torch.log_softmax(logits[want_logprobs], dim=-1) if want_logprobs else None

    processed = logits
    to_process = [i for i, r in enumerate(rows) if r.needs_processing]
    if to_process:
        processed = logits.clone()
        for i in to_process:
            processed[i] = rows[i].process(processed[i])
        # An extreme penalty (repetition 1e-100 divides by almost nothing) must not overflow a
        # row into infinities that no filter can rank: cap far below the float32 maximum, so that
        # dividing by the smallest sampling temperature (GREEDY_BELOW) still stays finite.
        processed = torch.nan_to_num(processed, nan=float("-inf"), posinf=_LOGIT_CAP)
    chosen = torch.argmax(processed, dim=-1)  # [B]; sampled rows are overwritten below
    sampled = [i for i, r in enumerate(rows) if not r.params.is_greedy]
    invalid: set[int] = set()
    if sampled:
        probs, order = _sampling_distributions(processed[sampled], [rows[i].params for i in sampled])
        ok = (torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)).tolist()
        picks = []
        for j, i in enumerate(sampled):
            if not ok[j]:
                invalid.add(i)
                picks.append(torch.zeros(1, dtype=torch.long, device=probs.device))
            else:
                picks.append(torch.multinomial(probs[j], 1, generator=rows[i].generator))
        picked = torch.cat(picks)
        if order is not None:
            picked = order.gather(1, picked[:, None])[:, 0]
        chosen[sampled] = picked
    # The tokens and the suspect flags in one transfer from the device (they were two).
    fetched = torch.cat([chosen, suspect.to(chosen.dtype)]).tolist()
    tokens: list[int | None] = fetched[: len(rows)]
    broken = {i for i, flag in enumerate(fetched[len(rows) :]) if flag and _not_finite(logits[i])}
    for i in invalid | broken:
        tokens[i] = None

    logprobs: list[TokenLogprob | None] = [None] * len(rows)
    for j, i in enumerate(want_logprobs):
        if tokens[i] is None:
            continue
        row_lp = raw_logprobs[j]
        top_n = min(rows[i].params.logprobs or 0, MAX_TOP_LOGPROBS)
        top: list[tuple[int, float]] = []
        if top_n:
            values, ids = torch.topk(row_lp, top_n)
            top = list(zip(ids.tolist(), values.tolist(), strict=True))
        logprobs[i] = TokenLogprob(tokens[i], float(row_lp[tokens[i]]), top)
    return tokens, logprobs


def _not_finite(row_logits: torch.Tensor) -> bool:
    """A NaN or a +inf among one row's logits (-inf is a masked token, not a failure)."""
    return bool(torch.isnan(row_logits).any() or torch.isposinf(row_logits).any())


def draw(logits: torch.Tensor, rows: Sequence[PlanRow]) -> list[SampledToken]:
    """One draw per sampler of the plan rows that sample. `logits` is `[R, vocab]`, one row per
    such plan row in order; a row shared by several samplers (the choices of an n > 1 request that
    fork from one prompt) is repeated for each, so every choice draws with its own generator."""
    counts = [len(row.samplers) for row in rows if row.samplers]
    if not counts:
        return []
    if any(count > 1 for count in counts):
        logits = torch.repeat_interleave(logits, torch.tensor(counts, device=logits.device), dim=0)
    tokens, logprobs = sample(logits, [s for row in rows for s in row.samplers])
    return [SampledToken(token, logprob) for token, logprob in zip(tokens, logprobs, strict=True)]


def score_prompts(logits: torch.Tensor, rows: Sequence[PlanRow]) -> torch.Tensor:
    """Fill the prompt logprobs of the rows that score their chunk, from the runner's logits
    (each row's scored positions, then its last position when it samples), and return the
    logits of the sampling rows alone, as `draw` takes them."""
    keep: list[int] = []
    cursor = 0
    for row in rows:
        if row.scoring is not None:
            count = len(row.scoring.targets)
            row.scoring.results.clear()  # a step retried row by row after a failure scores again
            _score(logits[cursor : cursor + count], row.scoring)
            cursor += count
        if row.samplers:
            keep.append(cursor)
            cursor += 1
    return logits[torch.tensor(keep, dtype=torch.long, device=logits.device)]


def _score(logits: torch.Tensor, scoring: PromptScoring) -> None:
    """Each target's logprob, rank and top alternatives from the logits `[targets, vocab]` of
    the positions before it, as the model's own log_softmax gives them."""
    top_n = min(scoring.top, MAX_TOP_LOGPROBS)
    targets = torch.tensor(scoring.targets, dtype=torch.long, device=logits.device)
    for begin in range(0, len(scoring.targets), _SCORE_PIECE):
        piece = torch.log_softmax(logits[begin : begin + _SCORE_PIECE].float(), dim=-1)
        ids = targets[begin : begin + _SCORE_PIECE]
        chosen = piece.gather(1, ids[:, None])[:, 0]
        ranks = ((piece > chosen[:, None]).sum(dim=-1) + 1).tolist()
        tops: list[list[tuple[int, float]]] = [[] for _ in ranks]
        if top_n:
            values, top_ids = torch.topk(piece, top_n, dim=-1)
            tops = [
                list(zip(i, v, strict=True)) for i, v in zip(top_ids.tolist(), values.tolist(), strict=True)
            ]
        for token, logprob, rank, top in zip(ids.tolist(), chosen.tolist(), ranks, tops, strict=True):
            scoring.results.append(TokenLogprob(token, logprob, top, rank=rank))
