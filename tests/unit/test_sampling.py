"""Per-row sampling: filters, penalties, bias, seeds, logprobs, and row isolation."""

from __future__ import annotations

import math

import torch

from models.params import SamplingParams
from models.sampling import RowSampler, _sampling_distributions, sample

CPU = torch.device("cpu")


def _filter_sampled(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row `[vocab]` through the batched filter, back in vocabulary order."""
    [(probs, order)], _ = _sampling_distributions(logits[None], [params])
    if order is None:
        return probs
    return torch.zeros_like(logits).scatter(0, order, probs / probs.sum())


def row(params: SamplingParams, prompt=(), eos=frozenset({9})) -> RowSampler:
    return RowSampler(
        params, vocab_size=10, device=CPU, prompt_ids=list(prompt), eos_token_ids=eos, seed=params.seed
    )


def test_greedy_rows_take_the_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0, 0, 0, 0, 0, 0, 0, 0], [5.0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    tokens, _ = sample(logits, [row(SamplingParams(max_tokens=1, temperature=0)) for _ in range(2)])
    assert tokens == [1, 0]


def test_top_k_top_p_min_p_keep_only_the_allowed_tokens():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.05, 0.05]))
    assert (_filter_sampled(logits, SamplingParams(max_tokens=1, top_k=2)) > 0).tolist() == [
        True,
        True,
        False,
        False,
        False,
    ]
    # top_p=0.6: 0.4 alone is below 0.6, so 0.3 is needed as well.
    assert (_filter_sampled(logits, SamplingParams(max_tokens=1, top_p=0.6)) > 0).tolist() == [
        True,
        True,
        False,
        False,
        False,
    ]
    assert (_filter_sampled(logits, SamplingParams(max_tokens=1, min_p=0.6)) > 0).tolist() == [
        True,
        True,
        False,
        False,
        False,
    ]


def test_seeded_rows_are_reproducible_and_independent_of_neighbours():
    logits = torch.zeros(1, 10)
    params = SamplingParams(max_tokens=1, temperature=1.0, seed=42)
    first = [sample(logits, [r])[0][0] for r in [row(params)] for _ in range(20)]
    again = [sample(logits, [r])[0][0] for r in [row(params)] for _ in range(20)]
    assert first == again
    # Same seed in a batch with another sampled row: same draws.
    target, neighbour = row(params), row(SamplingParams(max_tokens=1, temperature=1.0, seed=7))
    batched = [sample(torch.zeros(2, 10), [neighbour, target])[0][1] for _ in range(20)]
    assert batched == first
    assert len(set(first)) > 3


def test_seeded_draws_do_not_depend_on_what_neighbours_filter(monkeypatch):
    """A seeded row draws the same tokens whatever its neighbours' top_k/top_p/min_p: a row with
    no filter drew from the sorted candidates whenever a neighbour filtered, and a row's width
    (and top_k's renormalisation) followed the widest neighbour's."""
    import models.sampling as sampling

    monkeypatch.setattr(sampling, "_CANDIDATES", 8)
    vocab = 64
    gen = torch.Generator().manual_seed(3)
    # Rounded as bf16 logits are: ties, whose order in topk depends on k.
    logits = (torch.randn(vocab, generator=gen) * 2).to(torch.bfloat16).float()
    flat = torch.randn(vocab, generator=gen) * 0.01  # no candidate prefix decides its top_p
    neighbours = [
        SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5),
        SamplingParams(max_tokens=1, temperature=1.0, top_k=20),
        SamplingParams(max_tokens=1, temperature=1.0, min_p=0.2),
        SamplingParams(max_tokens=1, temperature=1.0, top_k=40, top_p=0.9),  # wider than 8
        SamplingParams(max_tokens=1, temperature=1.0, top_k=10**6, top_p=0.9),  # top_k >= vocab: none
    ]
    targets = [
        SamplingParams(max_tokens=1, temperature=1.0, seed=5),  # top_p 1: no filter
        SamplingParams(max_tokens=1, temperature=1.0, seed=5, top_k=8, top_p=0.9),
        SamplingParams(max_tokens=1, temperature=0.7, seed=5, top_p=0.95),
    ]

    def sampler(params):
        return RowSampler(
            params, vocab_size=vocab, device=CPU, prompt_ids=[], eos_token_ids=set(), seed=params.seed
        )

    for target in targets:
        alone = sampler(target)
        expected = [sample(logits[None], [alone])[0][0] for _ in range(30)]
        for neighbour, neighbour_logits in [(n, logits) for n in neighbours] + [(neighbours[0], flat)]:
            beside = sampler(target)
            other = sampler(neighbour)
            batch = torch.stack([neighbour_logits, logits])
            assert [sample(batch, [other, beside])[0][1] for _ in range(30)] == expected, (target, neighbour)


def test_repetition_presence_and_frequency_penalties():
    logits = torch.tensor([2.0, 2.0, -1.0, 0, 0, 0, 0, 0, 0, 0])
    r = row(SamplingParams(max_tokens=4, temperature=0, repetition_penalty=2.0), prompt=[0, 2])
    out = r.process(logits.clone())
    assert out[0] == 1.0 and out[1] == 2.0 and out[2] == -2.0
    r = row(SamplingParams(max_tokens=4, temperature=0, presence_penalty=1.0, frequency_penalty=0.5))
    r.accept(1)
    r.accept(1)
    out = r.process(logits.clone())
    assert out[1] == 2.0 - 1.0 - 1.0 and out[0] == 2.0


def test_logit_bias_and_min_tokens_ban_end_of_sequence():
    logits = torch.zeros(10)
    logits[9] = 10.0
    r = row(SamplingParams(max_tokens=4, temperature=0, min_tokens=2, logit_bias={3: 5.0}))
    out = r.process(logits.clone())
    assert out[9] == float("-inf") and out[3] == 5.0
    r.accept(3)
    r.accept(3)
    assert r.process(logits.clone())[9] == 10.0


def test_logprobs_are_from_the_raw_distribution():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0, 0, 0, 0, 0, 0, 0]])
    r = row(SamplingParams(max_tokens=1, temperature=0, logprobs=2, logit_bias={0: 50.0}))
    tokens, logprobs = sample(logits, [r])
    raw = torch.log_softmax(logits[0], -1)
    assert tokens == [0]  # the bias decides the token...
    assert math.isclose(logprobs[0].logprob, float(raw[0]), rel_tol=1e-5)  # ...not the logprob
    assert [t for t, _ in logprobs[0].top] == [2, 1]


def test_a_nan_row_fails_alone():
    logits = torch.zeros(3, 10)
    logits[1, 4] = float("nan")
    rows = [row(SamplingParams(max_tokens=1, temperature=t)) for t in (0.0, 0.0, 1.0)]
    rows[2] = row(SamplingParams(max_tokens=1, temperature=1.0, seed=1))
    tokens, _ = sample(logits, rows)
    assert tokens[1] is None and tokens[0] is not None and tokens[2] is not None


def test_only_rows_with_a_nan_or_a_positive_infinity_fail():
    """Rows are screened by their sum (one pass): a sum that overflows from huge finite logits, or
    -inf from masked tokens, must not fail a row; +inf, alone or next to -inf, must."""
    logits = torch.zeros(6, 10)
    logits[0, 3] = float("inf")
    logits[1, :5] = float("-inf")  # masked tokens: the row still has finite ones
    logits[2, :] = 3.0e38  # finite, but sums past the float32 maximum
    logits[2, 7] = 3.3e38
    logits[3, 2], logits[3, 5] = float("inf"), float("-inf")  # sums to NaN
    logits[4, 9] = 1.0
    logits[5, 0] = float("nan")
    rows = [row(SamplingParams(max_tokens=1, temperature=0.0)) for _ in range(6)]
    tokens, _ = sample(logits, rows)
    assert tokens[0] is None and tokens[3] is None and tokens[5] is None
    assert tokens[1] == 5 and tokens[2] == 7 and tokens[4] == 9


def test_candidate_shortcut_equals_the_full_vocabulary(monkeypatch):
    import models.sampling as sampling

    gen = torch.Generator().manual_seed(0)
    peaked = torch.randn(64, generator=gen) * 6  # mass concentrated in a few tokens, as in real LMs
    flat = torch.randn(64, generator=gen) * 0.1  # the shortcut cannot decide: full fallback
    for logits in (peaked, flat):
        for params in (
            SamplingParams(max_tokens=1, top_p=0.9),
            SamplingParams(max_tokens=1, min_p=0.05),
            SamplingParams(max_tokens=1, top_k=5, top_p=0.8),
        ):
            monkeypatch.setattr(sampling, "_CANDIDATES", 64)
            full = _filter_sampled(logits, params)
            monkeypatch.setattr(sampling, "_CANDIDATES", 8)
            short = _filter_sampled(logits, params)
            assert torch.allclose(full / full.sum(), short / short.sum(), atol=1e-6)


def test_extreme_parameters_still_give_a_token():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 0, 0, 0, 0, 0]])
    tiny_penalty = SamplingParams(max_tokens=1, temperature=0.7, repetition_penalty=1e-130, seed=1)
    tokens, _ = sample(logits, [row(tiny_penalty, prompt=[0, 1])])
    assert tokens[0] in (0, 1)  # the penalised (now enormous) logits win, and nothing overflows
    tiny_temperature = SamplingParams(max_tokens=1, temperature=1e-300, seed=1)
    assert tiny_temperature.is_greedy
    tokens, _ = sample(logits, [row(tiny_temperature)])
    assert tokens == [0]
