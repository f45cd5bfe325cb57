"""The batch bookkeeping without a model: admission, chunking, forks, preemption, prefix reuse.

A fake runner "samples" a token that depends only on the tokens before it (and the choice index),
the way a greedy model would, so that recomputing after preemption must give the same output.
"""

from __future__ import annotations

import random

import pytest

from tests.unit.batch_driver import Driver, expected_output, make, outputs, request


def test_requests_run_to_completion_with_their_own_lengths():
    batch = make()
    reqs = [request(range(i, i + 3 + i), max_tokens=2 + i, arrival=i) for i in range(5)]
    for r in reqs:
        batch.add(r)
    driver = Driver(batch)
    driver.run()
    for r in reqs:
        assert outputs(r) == [expected_output(r[0].token_ids[: r[0].num_prompt_tokens], r[0].max_tokens)]
    assert batch.blocks.num_free == batch.blocks.num_blocks


def test_prefill_is_chunked_within_the_budget():
    batch = make(max_prefill_tokens=8)
    long, short = request(range(30), arrival=0), request(range(50, 53), arrival=1)
    batch.add(long)
    batch.add(short)
    driver = Driver(batch)
    plan = driver.step()
    assert sum(len(r.token_ids) for r in plan.rows) <= 8
    # Shortest job first: the 3-token prompt is computed in the first step.
    assert [len(r.token_ids) for r in plan.rows][0] == 3
    driver.run()
    assert all(len(r.token_ids) <= 8 for p in driver.plans for r in p.rows)
    assert outputs(long) == [expected_output(list(range(30)), 4)]


def test_a_long_wait_beats_shortest_job_first():
    batch = make(max_prefill_tokens=8, now=10.0, prefill_aging_s=2.0)
    old_long, new_short = request(range(30), arrival=1.0), request(range(50, 53), arrival=9.5)
    batch.add(old_long)
    batch.add(new_short)
    plan = Driver(batch).step()
    assert plan.rows[0].seq_id == old_long[0].seq_id and len(plan.rows[0].token_ids) == 8


def test_n_above_the_free_rows_waits_for_rows_instead_of_hanging_the_queue():
    batch = make(max_rows=4)
    busy = request(range(5), max_tokens=12, arrival=0)
    batch.add(busy)
    wide = request(range(10, 14), n=4, max_tokens=3, arrival=1)
    behind = request(range(20, 24), max_tokens=2, arrival=2)
    batch.add(wide)
    batch.add(behind)
    driver = Driver(batch)
    driver.step()
    # The 4 choices do not fit beside the running request yet; the short one behind them takes a
    # free row meanwhile (it ends before the running request frees the rows the 4 need).
    assert batch.num_rows == 2 and behind[0].is_running and not wide[0].is_running
    driver.run()
    assert all(s.is_finished for s in [*busy, *wide, *behind])
    assert [len(o) for o in outputs(wide)] == [3, 3, 3, 3]


def test_a_wide_request_waiting_for_rows_is_passed_only_by_requests_that_end_before_it_could_start():
    """An n=4 request short of rows blocked every later request, free rows idle, until the
    running ones ended. Now a later request may take a free row if it ends within the steps the
    running ones need at most, so the wide request still starts when it could have."""
    batch = make(max_rows=4)
    busy = [request(range(i, i + 5), max_tokens=20, arrival=0, origin="x") for i in (0, 10)]
    for seqs in busy:
        batch.add(seqs)
    wide = request(range(30, 34), n=4, max_tokens=3, arrival=1, origin="a")
    short = request(range(40, 44), max_tokens=5, arrival=2, origin="b")
    long = request(range(50, 54), max_tokens=60, arrival=3, origin="c")
    for seqs in (wide, short, long):
        batch.add(seqs)
    driver = Driver(batch)
    driver.step()
    assert short[0].is_running and not long[0].is_running and not wide[0].is_running
    while not wide[0].is_running:
        assert not long[0].is_running  # never ahead of the wide request: it would end after it
        driver.step()
    assert all(s.is_finished for seqs in busy for s in seqs) and short[0].is_finished
    assert driver.steps <= 21  # admitted once the busy ones ended by their max_tokens
    driver.run()
    assert [len(o) for o in outputs(wide)] == [3, 3, 3, 3] and len(outputs(long)[0]) == 60


def test_more_choices_than_rows_is_refused():
    with pytest.raises(ValueError):
        make(max_rows=2).add(request(range(4), n=3))


def test_choices_share_the_prefill_and_differ_afterwards():
    batch = make()
    choices = request(range(6), n=3, max_tokens=3)
    batch.add(choices)
    driver = Driver(batch)
    plan = driver.step()
    assert len(plan.rows) == 1 and len(plan.rows[0].samplers) == 3  # one prefill, three draws
    assert [f[0] for f in plan.forks] == [choices[0].seq_id] * 2
    assert len(plan.copies) == 2  # 6 tokens: the partial second block is copied for each child
    parent_full = choices[0].block_table[0]
    assert all(c.block_table[0] == parent_full for c in choices)
    driver.run()
    assert outputs(choices) == [expected_output(list(range(6)), 3, i) for i in range(3)]
    assert len({tuple(o) for o in outputs(choices)}) == 3


def test_preemption_recomputes_and_gives_the_same_tokens():
    # 12 blocks of 4 tokens: four requests of 8 + 16 tokens cannot all keep their blocks.
    batch = make(num_blocks=12, block_size=4, max_rows=4, max_prefill_tokens=64)
    reqs = [request(range(10 * i, 10 * i + 8), max_tokens=16, arrival=i) for i in range(4)]
    for r in reqs:
        batch.add(r)
    driver = Driver(batch)
    driver.run()
    assert batch.num_preemptions > 0
    for r in reqs:
        assert outputs(r) == [expected_output(r[0].token_ids[:8], 16)]


def test_the_earliest_arrival_keeps_its_blocks():
    batch = make(num_blocks=6, block_size=4, max_rows=2, max_prefill_tokens=64)
    first, second = (
        request(range(8), max_tokens=12, arrival=0),
        request(range(20, 28), max_tokens=12, arrival=1),
    )
    batch.add(first)
    batch.add(second)
    driver = Driver(batch)
    preempted_ids = set()
    while batch.has_work:
        plan = driver.step()
        preempted_ids |= {
            i for i in plan.released if not any(s.seq_id == i and s.is_finished for s in [*first, *second])
        }
    assert second[0].seq_id in preempted_ids and first[0].seq_id not in preempted_ids


def test_a_request_larger_than_the_pool_is_rejected_not_stuck():
    batch = make(num_blocks=3, block_size=4)
    huge = request(range(20))
    batch.add(huge)
    assert batch.schedule() is None
    assert batch.rejected == [huge[0]] and not batch.has_work


def test_a_later_request_reuses_the_cached_prefix():
    batch = make(max_prefill_tokens=64)
    system = list(range(100, 116))  # four full blocks
    first = request(system + [1, 2], max_tokens=2, arrival=0)
    batch.add(first)
    driver = Driver(batch)
    driver.run()
    second = request(system + [7, 8, 9], max_tokens=2, arrival=1)
    batch.add(second)
    plan = driver.step()
    assert plan.rows[0].start == 16 and plan.rows[0].token_ids == [7, 8, 9]
    driver.run()
    assert outputs(second) == [expected_output(system + [7, 8, 9], 2)]
    assert batch.blocks.hit_tokens == 16


def test_a_failed_prefill_offers_no_blocks_to_prefix_hits():
    """A row that failed (its request answered with an error) still registered the blocks of its
    chunk, whose keys and values were never written: every later prompt sharing the prefix read
    them and answered wrong, without an error."""
    batch = make(max_prefill_tokens=64)
    system = list(range(100, 116))  # four full blocks
    [first] = request(system + [1, 2], max_tokens=2, arrival=0)
    batch.add([first])
    plan = batch.schedule()
    driver = Driver(batch)
    for seq, _sample in batch.advance(plan, driver.execute(plan), failed={first.seq_id}):
        assert seq is first
    batch.finish(first)
    driver.check()
    second = request(system + [7, 8, 9], max_tokens=2, arrival=1)
    batch.add(second)
    plan = driver.step()
    assert plan.rows[0].start == 0  # computed from the first token, not from the failed blocks
    driver.run()
    assert outputs(second) == [expected_output(system + [7, 8, 9], 2)]
    assert batch.blocks.hit_tokens == 0


def test_a_request_waits_for_a_prefix_another_is_computing():
    batch = make(max_prefill_tokens=8)
    system = list(range(100, 124))  # 6 blocks, computed in 3 chunks of 8
    batch.add(request(system + [1], max_tokens=1, arrival=0))
    driver = Driver(batch)
    driver.step()
    batch.add(request(system + [2], max_tokens=1, arrival=1))
    started = []
    while batch.has_work:
        plan = driver.step()
        started += [r.start for r in plan.rows if r.token_ids[-1] == 2 or r.start >= 24]
    assert 24 in started  # the second request computed only its own last token
    assert batch.blocks.hit_tokens == 24


def test_cancelled_waiting_and_running_requests_leave_cleanly():
    batch = make(max_rows=2)
    running = request(range(5), max_tokens=50, arrival=0)
    waiting = request(range(10, 15), n=2, max_tokens=5, arrival=1)
    batch.add(running)
    batch.add(waiting)
    driver = Driver(batch)
    driver.step()
    gone = batch.finish(waiting[0])
    assert gone == waiting and not batch.waiting
    batch.finish(running[0])
    plan = batch.schedule()
    assert plan is not None and plan.rows == [] and running[0].seq_id in plan.released
    assert batch.blocks.num_free == batch.blocks.num_blocks and not batch.has_work


def test_random_workload_keeps_the_books_balanced():
    rng = random.Random(7)
    batch = make(num_blocks=24, block_size=4, max_rows=6, max_prefill_tokens=12)
    driver = Driver(batch)
    shared = [rng.randrange(500) for _ in range(12)]
    everything = []
    for step in range(400):
        if step < 250 and rng.random() < 0.3:
            prompt = (shared if rng.random() < 0.5 else []) + [
                rng.randrange(500) for _ in range(rng.randrange(1, 20))
            ]
            req = request(prompt, n=rng.choice([1, 1, 2, 3]), max_tokens=rng.randrange(1, 30), arrival=step)
            batch.add(req)
            everything.append(req)
        if batch.running and rng.random() < 0.05:
            batch.finish(rng.choice(batch.running))  # a client goes away
        driver.step()
    driver.run()
    assert all(s.is_finished for req in everything for s in req)
    assert batch.blocks.num_free == batch.blocks.num_blocks
    assert batch.blocks.hit_tokens > 0 and batch.num_preemptions > 0


def test_one_clients_many_prompts_do_not_hold_back_another_client():
    batch = make(max_rows=4)
    flood = [
        request(range(100 + 10 * i, 105 + 10 * i), max_tokens=8, arrival=i * 0.001, origin="flood")
        for i in range(20)
    ]
    for r in flood:
        batch.add(r)
    single = request(range(7, 12), max_tokens=2, arrival=1.0, origin="single")
    batch.add(single)
    driver = Driver(batch)
    driver.step()
    assert single[0].is_running  # admitted in the first step, beside the flood's first prompts
    driver.run()
    assert single[0].is_finished and all(r[0].is_finished for r in flood)


def test_a_sequence_crossing_the_long_rope_threshold_is_computed_again_from_its_first_token():
    """LongRoPE models switch to the long factors once a sequence is longer than the threshold;
    keys computed under the short ones are dropped, as transformers drops its cache."""
    batch = make(long_rope_after=10)
    crossing = request(range(8), max_tokens=6)
    past = request(range(20, 32), max_tokens=2, arrival=1)
    batch.add(crossing)
    batch.add(past)
    assert past[0].cache_salt == "long-rope" and crossing[0].cache_salt is None
    driver = Driver(batch)
    driver.run()
    assert outputs(crossing) == [expected_output(list(range(8)), 6)]
    assert outputs(past) == [expected_output(list(range(20, 32)), 2)]
    rows = [r for p in driver.plans for r in p.rows if r.seq_id == crossing[0].seq_id]
    # Decoding fed positions 8 and 9 (11 tokens then: over the threshold), then everything again.
    recompute = [r for r in rows if r.start == 0 and len(r.token_ids) > 1]
    assert len(recompute) == 2 and recompute[1].end >= 11
    assert crossing[0].cache_salt == "long-rope"
    # Every row says how long its sequence is, which is what picks the factors.
    assert all(r.seq_len >= r.end for r in rows)


def test_a_wide_request_waits_for_backfilled_ones_at_most_backfill_steps_when_the_running_one_ends_early():
    """The running request may stop at an end token long before its max_tokens: a backfilled
    request as long as that max_tokens held the rows the wide one needed (admitted at step 152
    instead of 6). Backfills end within `backfill_steps`, so the wait past the early end is bounded."""
    batch = make(max_rows=4, num_blocks=256, backfill_steps=8)
    running = request(range(5), max_tokens=200, arrival=0, origin="x")
    batch.add(running)
    driver = Driver(batch)
    driver.step()
    wide = request(range(30, 34), n=4, max_tokens=3, arrival=1, origin="a")
    batch.add(wide)
    long_ones, short_ones = [], []
    for step in range(40):
        if step % 4 == 0:
            long_ones.append(
                request(range(100 + step, 104 + step), max_tokens=150, arrival=2 + step, origin=f"l{step}")
            )
            short_ones.append(
                request(range(200 + step, 204 + step), max_tokens=4, arrival=2 + step, origin=f"s{step}")
            )
            batch.add(long_ones[-1])
            batch.add(short_ones[-1])
        if step == 5:
            batch.finish(running[0])  # an end token, 195 tokens early
        driver.step()
        assert not any(
            seqs[0].is_running for seqs in long_ones if not wide[0].is_finished and not wide[0].is_running
        )
        if wide[0].is_running or wide[0].is_finished:
            break
    assert wide[0].is_running or wide[0].is_finished
    assert driver.steps <= 6 + 8 + 2  # the early end, then at most backfill_steps (and a prefill step)
    assert any(seqs[0].is_running or seqs[0].is_finished for seqs in short_ones)  # short ones did pass
