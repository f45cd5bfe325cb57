"""The batch bookkeeping for image rows without a model: an image is prefilled in one chunk and
alone in its step, a preempted image sequence recomputes its generated tokens apart from its
pixels, and side slots (cross-attention states) are taken, filled and shared by choices."""

from __future__ import annotations

import random

from models.plan import SequenceInputs
from scheduler.sequence import PromptSpan, Sequence
from tests.unit.batch_driver import Driver, FakeSampler, expected_output, make, outputs, request


def test_an_image_is_computed_in_one_chunk_and_alone_in_its_step():
    batch = make(max_prefill_tokens=6)
    image = PromptSpan(3, 12, b"px")
    a = request(range(20), image=image, arrival=0)
    b = request(range(40, 60), image=PromptSpan(2, 9, b"py"), arrival=0.5)
    batch.add(a)
    batch.add(b)
    driver = Driver(batch)
    driver.run()
    for plan in driver.plans:
        with_images = [r for r in plan.rows if r.mm_inputs is not None]
        assert len(with_images) <= 1
    image_rows = [(p, r) for p in driver.plans for r in p.rows if r.mm_inputs is not None]
    assert len(image_rows) == 2
    for _, row in image_rows:
        span = image if row.seq_id == a[0].seq_id else PromptSpan(2, 9, b"py")
        assert row.start <= span.first and row.end > span.last


def test_a_preempted_image_sequence_computes_its_generated_tokens_apart_from_the_pixels():
    """Recomputed after a preemption, the chunk with the image's pixels ends with the prompt: its
    generated tokens may hold the image placeholder, which the model counts against the image's
    features when pixels come with the row (a 500 after half the answer had streamed)."""
    batch = make(num_blocks=12, block_size=4, max_rows=4, max_prefill_tokens=64, prefix_caching=False)
    reqs = [
        request(range(10 * i, 10 * i + 8), max_tokens=16, arrival=i, image=PromptSpan(1, 4, b"p%d" % i))
        for i in range(4)
    ]
    for r in reqs:
        batch.add(r)
    driver = Driver(batch)
    driver.run()
    assert batch.num_preemptions > 0
    pixel_rows = [row for plan in driver.plans for row in plan.rows if row.mm_inputs is not None]
    assert len(pixel_rows) > len(reqs)  # computed again after preemptions
    assert all(row.end <= 8 for row in pixel_rows)  # never past the 8-token prompts
    for r in reqs:
        assert outputs(r) == [expected_output(r[0].token_ids[:8], 16)]


def test_a_span_without_images_shares_a_step_with_an_image_chunk_but_is_never_split():
    batch = make(max_prefill_tokens=6)
    image = PromptSpan(3, 12, b"px")
    prefix = PromptSpan(0, 9, b"pf", has_images=False)
    a = request(range(20), image=image, arrival=0)
    b = request(range(40, 60), image=prefix, arrival=0)
    batch.add(a)
    batch.add(b)
    driver = Driver(batch)
    driver.run()
    b_rows = [r for p in driver.plans for r in p.rows if r.seq_id == b[0].seq_id and r.start <= 9]
    assert b_rows[0].start == 0 and b_rows[0].end >= 10  # the span in one chunk
    assert not any(r.with_images for r in b_rows)
    shared = [p for p in driver.plans if {r.seq_id for r in p.rows} >= {a[0].seq_id, b[0].seq_id}]
    assert shared


def test_side_slots_are_taken_with_the_sequence_filled_before_use_and_shared_by_its_choices():
    """Mllama's cross-attention states live in side blocks: counted at admission, filled by the
    sequence's first row after they were taken (again after a preemption), read by every later
    row and by the other choices of the request, and given back with the sequence."""
    rng = random.Random(3)
    batch = make(num_blocks=30, block_size=4, max_rows=6, max_prefill_tokens=12)
    driver = Driver(batch)
    filled: set[int] = set()
    execute = driver.execute

    def checked(plan):
        filled.difference_update(plan.fresh_blocks)  # handed out anew: contents gone
        for row in plan.rows:
            if row.mm_inputs is not None:
                filled.update(row.side_blocks)
            assert set(row.side_blocks) <= filled, "a row read side slots nobody filled"
        return execute(plan)

    driver.execute = checked
    everything = []
    for step in range(300):
        if step < 200 and rng.random() < 0.3:
            prompt = [rng.randrange(500) for _ in range(rng.randrange(2, 16))]
            req = [
                Sequence(
                    prompt,
                    max_tokens=rng.randrange(1, 20),
                    arrival=step,
                    index=i,
                    sampler=FakeSampler(i),
                    inputs=SequenceInputs(mm_inputs={"image": 1}, side_tokens=6),
                    side_tokens=6,
                )
                for i in range(rng.choice([1, 2, 3]))
            ]
            batch.add(req)
            everything.append(req)
        driver.step()
    driver.run()
    assert all(s.is_finished for req in everything for s in req)
    assert batch.blocks.num_free == batch.blocks.num_blocks
    assert batch.num_preemptions > 0


def test_side_slots_count_against_admission():
    batch = make(num_blocks=4, block_size=4)
    seq = Sequence(list(range(6)), max_tokens=1, arrival=0, sampler=FakeSampler(), side_tokens=9)
    batch.add([seq])  # 2 blocks of prompt and 3 of side slots: more than the pool
    assert batch.schedule() is None
    assert batch.rejected == [seq]
