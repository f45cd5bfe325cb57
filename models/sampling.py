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
        # Set when the grammar or the bans left no token: the row failed by its request.
        self.nothing_allowed = False
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
        twin.nothing_allowed = False
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
) -> tuple[list[tuple[torch.Tensor, torch.Tensor | None]], torch.Tensor]:
    """Temperature, top-k, top-p and min-p for the sampled rows `[S, vocab]`, batched where the
    result cannot depend on the batch. Per row: unnormalised probabilities and the vocabulary ids
    their entries stand for (None: the whole vocabulary in natural order); and `[S]` flags, true
    where a row's probabilities are finite and not all 0 (read in one transfer by the caller).

    What a row draws from depends on its own logits and parameters only (its width, its order),
    so that a seeded row draws the same tokens beside any neighbours: an unfiltered row took the
    sorted path whenever a neighbour filtered, and the same generator state picked another token."""
    vocab = logits.shape[-1]
    device = logits.device
    logits = logits / torch.tensor([p.temperature for p in params], device=device)[:, None]
    out: list[tuple[torch.Tensor, torch.Tensor | None]] = [None] * len(params)  # type: ignore[list-item]
    usable = torch.ones(len(params), dtype=torch.bool, device=device)
    filters = [0 < p.top_k < vocab or p.top_p < 1.0 or p.min_p > 0.0 for p in params]
    filtered = [j for j, f in enumerate(filters) if f]
    plain = [j for j, f in enumerate(filters) if not f]
    if plain:
        probs = torch.softmax(logits if len(plain) == len(params) else logits[plain], dim=-1)
        usable[plain] = _usable(probs)
        for j, probs_row in zip(plain, probs, strict=True):
            out[j] = (probs_row, None)
    if not filtered:
        return out, usable
    # Each row's candidates: its _CANDIDATES (or top_k) most likely tokens, when its kept tokens
    # all lie among them; sorting all 150k entries of a large vocabulary costs 10x more.
    widths = [
        min(vocab, max(_CANDIDATES, params[j].top_k if params[j].top_k < vocab else 0)) for j in filtered
    ]
    sub = logits if len(filtered) == len(params) else logits[filtered]
    # One topk per width: the order of tied logits depends on k, and a row's draw must not depend
    # on the width a neighbour asked for (ties are common in bf16 logits).
    top_logits = torch.full((len(filtered), max(widths)), float("-inf"), device=device)
    order = torch.zeros(len(filtered), max(widths), dtype=torch.long, device=device)
    for width in set(widths):
        members = [k for k, w in enumerate(widths) if w == width]
        rows_logits = sub if len(members) == len(filtered) else sub[members]
        values, indices = torch.topk(rows_logits, width, dim=-1)  # sorted, most likely first
        if len(members) == len(filtered):
            top_logits[:, :width], order[:, :width] = values, indices
        else:
            top_logits[members, :width], order[members, :width] = values, indices
    # True probabilities of the candidates (over the whole vocabulary) tell whether the filters
    # can be decided among them; rows where they cannot take the full vocabulary.
    full = torch.exp(top_logits - torch.logsumexp(sub, dim=-1, keepdim=True))
    suffice = _candidates_suffice(full, widths, [params[j] for j in filtered])
    whole = [k for k, width in enumerate(widths) if width < vocab and not suffice[k]]
    candidates = [k for k in range(len(filtered)) if k not in whole]
    if candidates:
        probs = _filtered(
            top_logits[candidates], full[candidates], [params[filtered[k]] for k in candidates], vocab
        )
        beyond = (
            torch.arange(probs.shape[-1], device=device)[None, :]
            >= torch.tensor([widths[k] for k in candidates], device=device)[:, None]
        )
        usable[[filtered[k] for k in candidates]] = _usable(probs.masked_fill(beyond, 0.0))
        for probs_row, k in zip(probs, candidates, strict=True):
            out[filtered[k]] = (probs_row[: widths[k]], order[k, : widths[k]])
    if whole:
        rows = sub[whole]
        sorted_logits, sorted_order = torch.sort(rows, dim=-1, descending=True)
        probs = _filtered(
            sorted_logits, torch.softmax(sorted_logits, dim=-1), [params[filtered[k]] for k in whole], vocab
        )
        usable[[filtered[k] for k in whole]] = _usable(probs)
        for index, k in enumerate(whole):
            out[filtered[k]] = (probs[index], sorted_order[index])
    return out, usable


def _usable(probs: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)


def _filtered(
    top_logits: torch.Tensor, full: torch.Tensor, params: list[SamplingParams], vocab: int
) -> torch.Tensor:
    """`full` (true probabilities of the most likely tokens, `top_logits` theirs, first first)
    with each row's top-k, top-p and min-p applied; entries filtered out are 0."""
    device = top_logits.device
    width = top_logits.shape[-1]
    ranks = torch.arange(width, device=device)[None, :]
    has_k = [0 < p.top_k < vocab for p in params]
    top_k = torch.tensor([p.top_k if k else width for p, k in zip(params, has_k, strict=True)], device=device)
    # Rows with top_k renormalise over their k best (as `top_k` then `top_p` do elsewhere),
    # whatever width their neighbours needed.
    probs = torch.where(
        torch.tensor(has_k, device=device)[:, None],
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
    return probs.masked_fill(drop, 0.0)


def _candidates_suffice(full: torch.Tensor, widths: list[int], params: list[SamplingParams]) -> list[bool]:
    """For each row, whether its kept tokens lie among its first `widths[k]` candidates in `full`
    `[F, >= max(widths)]` (true probabilities, most likely first); one transfer for all rows."""
    device = full.device
    ends = torch.tensor(widths, device=device)[:, None] - 1
    mass = torch.cumsum(full, dim=-1).gather(1, ends)[:, 0]
    last = full.gather(1, ends)[:, 0]
    mass, last, top = torch.stack([mass, last, full[:, 0]]).tolist()
    return [
        (0 < p.top_k <= width)
        or (p.top_p < 1.0 and mass[k] >= p.top_p)
        or (p.min_p > 0.0 and last[k] < p.min_p * top[k])
        for k, (p, width) in enumerate(zip(params, widths, strict=True))
    ]


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
        # Masked tokens stay at -inf (nan_to_num's default turned them into the lowest finite
        # float, and a row whose grammar allowed nothing had an argmax, token 0, to fail on).
        processed = torch.nan_to_num(processed, nan=float("-inf"), posinf=_LOGIT_CAP, neginf=float("-inf"))
    chosen = torch.argmax(processed, dim=-1)  # [B]; sampled rows are overwritten below
    sampled = [i for i, r in enumerate(rows) if not r.params.is_greedy]
    invalid: set[int] = set()
    if sampled:
        distributions, usable = _sampling_distributions(processed[sampled], [rows[i].params for i in sampled])
        picks = []
        for (probs, order), i, ok in zip(distributions, sampled, usable.tolist(), strict=True):
            if not ok:
                invalid.add(i)
                picks.append(torch.zeros(1, dtype=torch.long, device=probs.device))
                continue
            pick = torch.multinomial(probs, 1, generator=rows[i].generator)
            picks.append(pick if order is None else order[pick])
        chosen[sampled] = torch.cat(picks)
    # Rows where nothing may be sampled: a grammar that allows no token (one that names the
    # end-of-text token in its text, one that cannot go on), or bans alone (min_tokens with
    # stop_token_ids covering a small vocabulary). Their argmax, token 0, failed a greedy request
    # as the server's fault (500) where a sampled one was a 400.
    blocked = torch.zeros(len(rows), dtype=chosen.dtype, device=chosen.device)
    if to_process:
        blocked[to_process] = torch.isneginf(processed[to_process]).all(dim=-1).to(chosen.dtype)
    # The tokens, the suspect flags and the blocked rows in one transfer from the device.
    fetched = torch.cat([chosen, suspect.to(chosen.dtype), blocked]).tolist()
    tokens: list[int | None] = fetched[: len(rows)]
    broken = {
        i for i, flag in enumerate(fetched[len(rows) : 2 * len(rows)]) if flag and _not_finite(logits[i])
    }
    for i, flag in enumerate(fetched[2 * len(rows) :]):
        if flag:
            rows[i].nothing_allowed = True
            invalid.add(i)
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
