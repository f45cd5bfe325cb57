"""The seeds the choices of an n > 1 request sample with."""

from __future__ import annotations

from models.params import choice_seed


def test_choice_seeds_keep_the_first_and_never_overlap_neighbouring_requests() -> None:
    assert choice_seed(7, 0) == 7 and choice_seed(2**64 - 1, 0) == 2**64 - 1
    seeds = {(seed, index): choice_seed(seed, index) for seed in range(64) for index in range(8)}
    assert len(set(seeds.values())) == len(seeds)  # no two (request seed, choice) pairs draw alike
    assert all(0 <= value < 2**64 for value in seeds.values())
    assert choice_seed(2**64 - 1, 3) < 2**64
