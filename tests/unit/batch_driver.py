"""A batch driven without a model: a fake runner "samples" a token that depends only on the tokens
before it (and the choice index), the way a greedy model would, so that recomputing after
preemption must give the same output."""

from __future__ import annotations

from models.plan import SampledToken, SequenceInputs, StepPlan
from scheduler.batch import Batch, BatchConfig
from scheduler.blocks import BlockManager
from scheduler.sequence import Sequence


class FakeSampler:
    def __init__(self, index: int = 0) -> None:
        self.index = index


def next_token(tokens: list[int], index: int) -> int:
    return (sum(tokens) * 31 + len(tokens) * 7 + index * 1000) % 997


def request(prompt, *, n=1, max_tokens=4, arrival=0.0, image=None, origin="") -> list[Sequence]:
    return [
        Sequence(
            list(prompt),
            max_tokens=max_tokens,
            arrival=arrival,
            index=i,
            sampler=FakeSampler(i),
            span=image,
            inputs=SequenceInputs(mm_inputs={"image": 1}) if image else None,
            origin=origin,
        )
        for i in range(n)
    ]


class Driver:
    """Runs the batch as the executor does, checking the block books after every step."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.plans: list[StepPlan] = []
        self.steps = 0

    def execute(self, plan: StepPlan) -> list[SampledToken]:
        results = []
        by_id = {s.seq_id: s for s in self.batch.running}
        for row in plan.rows:
            seq = by_id[row.seq_id]
            assert row.token_ids == seq.token_ids[row.start : row.end]
            assert len(row.block_table) * self.batch.blocks.block_size >= row.end
            context = seq.token_ids[: row.end]
            for sampler in row.samplers:
                results.append(SampledToken(next_token(context, sampler.index)))
        return results

    def step(self) -> StepPlan | None:
        plan = self.batch.schedule()
        if plan is None:
            return None
        self.plans.append(plan)
        for seq, _sample in self.batch.advance(plan, self.execute(plan)):
            if seq.num_generated >= seq.max_tokens:
                self.batch.finish(seq)
        self.steps += 1
        self.check()
        return plan

    def run(self, limit: int = 10_000) -> None:
        while self.batch.has_work and self.steps < limit:
            if self.step() is None:
                break
        assert not self.batch.has_work, "work left but nothing scheduled"

    def check(self) -> None:
        held = [*self.batch.running, *(c for s in self.batch.running for c in s.pending_children)]
        tables = [s.block_table for s in held] + [s.side_table for s in held]
        self.batch.blocks.check(tables)
        assert self.batch.num_rows <= self.batch.config.max_rows


def make(num_blocks=64, block_size=4, *, prefix_caching=True, now=0.0, **config) -> Batch:
    """Arrival times in these tests are small numbers; the clock stands at `now`."""
    config.setdefault("max_rows", 8)
    config.setdefault("max_prefill_tokens", 16)
    blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    return Batch(BatchConfig(**config), blocks, clock=lambda: now)


def expected_output(prompt: list[int], max_tokens: int, index: int = 0) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens, index))
    return tokens[len(prompt) :]


def outputs(seqs) -> list[list[int]]:
    return [s.token_ids[s.num_prompt_tokens :] for s in seqs]
