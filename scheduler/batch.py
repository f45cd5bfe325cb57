"""The batch of one replica: who waits, who runs, and what each step computes. No tensors.

A step is schedule -> run -> advance:

- `schedule()` gives every decoding sequence a KV slot, preempting the latest arrivals when the
  pool runs out of blocks; admits waiting requests while rows (`max_rows`) and blocks allow, all
  choices of an n > 1 request together; and spends the prefill budget on prompts (shortest job
  first, with aging so long ones are never starved). It returns a `StepPlan`.
- a runner executes the plan (`models.runner`, `models.generic`);
- `advance()` records what was computed and sampled, forks the choices of n > 1 requests whose
  prompt completed, and makes filled blocks available to prefix hits.

Preemption is by recompute (as vLLM does by default): a preempted sequence gives its blocks back
and later prefills its prompt and the tokens it already generated again; with prefix caching most
of that is found in the cache. Swapping to host memory would need a second pool and copies on
every preemption, for a case the admission watermark already makes rare.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Collection
from dataclasses import dataclass

from models.plan import PlanRow, PromptScoring, SampledToken, StepPlan
from scheduler.blocks import BlockManager
from scheduler.sequence import Sequence


@dataclass(frozen=True)
class BatchConfig:
    max_rows: int = 32  # sequences in the batch at once (MAX_BATCH_SIZE)
    max_prefill_tokens: int = 512  # prompt tokens computed per step
    chunked_prefill: bool = True  # False: a prompt is computed in one step (runners that cannot chunk)
    prefill_aging_s: float = 2.0
    watermark_blocks: int = 0  # free blocks admission leaves for running sequences to grow into
    # A request with several choices short of rows lets later requests use the free rows only if
    # they end within this many steps: running sequences may end early (an end token), and then
    # the wide request waits for these, at most this long (about a second at the bench model's
    # 30 ms steps on two CPU cores).
    backfill_steps: int = 32
    # LongRoPE (Phi-3 and kin): a sequence longer than this many tokens uses the long scaling, and
    # one that grows past it is computed again from its first token, as transformers does.
    long_rope_after: int | None = None


class Batch:
    def __init__(
        self, config: BatchConfig, blocks: BlockManager, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.blocks = blocks
        self._clock = clock
        # Requests not admitted yet, each as its first choice with the others in pending_children.
        self.waiting: deque[Sequence] = deque()
        # Sequences that lost their blocks to an earlier arrival: admitted again before anything new.
        self.preempted: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Waiting requests that can never fit the pool, even alone; the executor fails them.
        self.rejected: list[Sequence] = []
        self.num_preemptions = 0
        self._released: list[int] = []
        self._rows: list[Sequence] = []  # the sequence of each row of the last plan
        self._forks: dict[int, list[Sequence]] = {}  # parent seq_id -> choices forked by the last plan
        self._now = 0.0  # the clock at the last schedule()

    # -- state ---------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        """Rows taken: running sequences plus the choices reserved for their fork."""
        return sum(1 + len(seq.pending_children) for seq in self.running)

    @property
    def num_waiting(self) -> int:
        return sum(1 + len(seq.pending_children) for seq in (*self.preempted, *self.waiting))

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.preempted)

    def figures(self) -> dict:
        """The pool's and the prefix cache's figures, for /health and the metrics."""
        blocks = self.blocks
        return {
            "kv_blocks_total": blocks.num_blocks,
            "kv_blocks_used": blocks.num_used,
            "kv_cache_usage": round(blocks.usage, 4),
            # Tokens the running sequences hold blocks for (whole prompts are allocated at admission),
            # and the same rounded up to whole blocks: what the blocks in use can be at most.
            "kv_tokens_live": sum(seq.num_tokens for seq in self.running),
            "kv_tokens_live_in_blocks": sum(blocks.blocks_for(seq.num_tokens) for seq in self.running)
            * blocks.block_size,
            "prefix_cache_queries": blocks.query_tokens,
            "prefix_cache_hits": blocks.hit_tokens,
            "preemptions": self.num_preemptions,
        }

    def take_released(self) -> list[int]:
        """Sequences that left since the last plan (for runners that keep state per sequence)."""
        released, self._released = self._released, []
        return released

    def add(self, seqs: list[Sequence]) -> None:
        """A new request: its choices are admitted together; the first computes the prompt."""
        if len(seqs) > self.config.max_rows:
            raise ValueError(f"{len(seqs)} choices cannot share a batch of {self.config.max_rows} rows")
        parent = seqs[0]
        parent.pending_children = list(seqs[1:])
        for seq in seqs:
            seq.cache_salt = self._rope_salt(seq)
        self.waiting.append(parent)

    def _rope_salt(self, seq: Sequence) -> str | None:
        limit = self.config.long_rope_after
        return "long-rope" if limit is not None and seq.num_tokens > limit else None

    # -- leaving -------------------------------------------------------------------------------
    def finish(self, seq: Sequence) -> list[Sequence]:
        """Take `seq` out of the batch and give back its blocks. Choices still waiting to fork
        from it leave with it (they have no prompt without it). Returns every sequence that left."""
        gone = [seq, *seq.pending_children]
        if seq.is_running:
            self._release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.preempted:
            self.preempted.remove(seq)
        for s in gone:
            s.is_finished = True
        seq.pending_children = []
        return gone

    def _release(self, seq: Sequence) -> None:
        for child in seq.pending_children:
            self.blocks.free(child)
        self.blocks.free(seq)
        seq.is_running = False
        self.running.remove(seq)
        self._released.append(seq.seq_id)

    def _preempt(self, victim: Sequence) -> None:
        self._release(victim)
        self.preempted.appendleft(victim)
        self.num_preemptions += 1

    # -- schedule ------------------------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        """The next step's plan, or None when there is nothing to do."""
        now = self._now = self._clock()
        rows = self._schedule_decodes()
        self._admit()
        rows += self._schedule_prefills(now, {seq.seq_id for seq, _ in rows})
        if not rows and not self._released:
            return None
        plan = StepPlan(released=self.take_released())
        for seq, take in rows:
            plan.rows.append(self._plan_row(seq, take, plan))
        self._rows = [seq for seq, _ in rows]
        plan.fresh_blocks = self.blocks.take_fresh()
        return plan

    def _schedule_decodes(self) -> list[tuple[Sequence, int]]:
        """Every running sequence with one token to feed gets a slot for it, most important first;
        when blocks run out the least important running sequence is preempted (maybe itself)."""
        rows = []
        for seq in sorted(self.running, key=Sequence.priority):
            if not seq.is_running or seq.num_uncomputed != 1 or seq.pending_children:
                continue
            while not self.blocks.ensure_slots(seq):
                victim = max(self.running, key=Sequence.priority)
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.is_running:
                rows.append((seq, 1))
        return rows

    def _admit(self) -> None:
        """Admit waiting requests while rows and blocks allow: preempted sequences first, then
        new requests taking turns between origins (the origin with the fewest running sequences
        next, each origin's in arrival order), so one client's 250-prompt completion cannot keep
        the others waiting. A request whose prompt is mostly a prefix another sequence is
        computing right now (a shared system prompt in a burst) waits for it, as SGLang does, and
        finds it in the cache a few steps later; the others go ahead meanwhile."""
        while self.preempted:
            if self._try_admit(self.preempted[0], wait_for_prefix=False) == "full":
                return
            self.preempted.popleft()
        if not self.waiting:
            return
        by_origin: dict[str, deque[Sequence]] = {}
        for seq in self.waiting:
            by_origin.setdefault(seq.origin, deque()).append(seq)
        running = Counter(seq.origin for seq in self.running)
        taken: set[int] = set()
        # Set when a request with several choices finds too few free rows: how many steps later
        # requests may take to end if they use the free rows meanwhile (backfilling): no more than
        # the running sequences take at most to free the rows it lacks, nor `backfill_steps`, their
        # prompts counted together against the prefill budget they share. A wide request no
        # longer holds every later one back, and waits for them at most `backfill_steps` longer
        # (when the running ones end early; preempted, a backfilled one comes back first).
        horizon: int | None = None
        backfill_prompts = 0
        while by_origin:
            origin = min(by_origin, key=lambda o: (running[o], by_origin[o][0].arrival))
            seq = by_origin[origin].popleft()
            if not by_origin[origin]:
                del by_origin[origin]
            if horizon is not None and self._steps_to_finish(seq, backfill_prompts) > horizon:
                continue
            outcome = self._try_admit(seq)
            if outcome == "full":
                if horizon is None and self._short_of_rows_only(seq):
                    horizon = min(
                        self.config.backfill_steps, self._steps_until_rows(1 + len(seq.pending_children))
                    )
                    # The prompts still being computed share the budget with a backfilled one's.
                    backfill_prompts = sum(running_seq.num_uncomputed for running_seq in self.running)
                    continue
                break
            if horizon is not None and outcome == "admitted":
                backfill_prompts += seq.num_uncomputed
            if outcome in ("admitted", "rejected"):
                taken.add(seq.seq_id)
                running[origin] += 1 + len(seq.pending_children)
        if taken:
            self.waiting = deque(seq for seq in self.waiting if seq.seq_id not in taken)

    def _short_of_rows_only(self, seq: Sequence) -> bool:
        """`seq`'s choices need more rows than are free, while some are free for others."""
        free = self.config.max_rows - self.num_rows
        return 0 < free < 1 + len(seq.pending_children)

    def _steps_until_rows(self, needed: int) -> int:
        """Decode steps after which `needed` rows are free at the latest: the running sequences
        that end soonest end by their max_tokens (any may end sooner, at an end token)."""
        lacking = needed - (self.config.max_rows - self.num_rows)
        for steps, rows in sorted(
            (self._steps_to_finish(seq), 1 + len(seq.pending_children)) for seq in self.running
        ):
            lacking -= rows
            if lacking <= 0:
                return steps
        return 0

    def _steps_to_finish(self, seq: Sequence, prompts_before: int = 0) -> int:
        """Steps `seq` takes at most, its prompt computed after `prompts_before` other tokens."""
        prefill_steps = -(-(prompts_before + seq.num_uncomputed) // max(1, self.config.max_prefill_tokens))
        return prefill_steps + seq.max_tokens - seq.num_generated

    def _try_admit(self, seq: Sequence, *, wait_for_prefix: bool = True) -> str:
        """admitted | postponed (its prefix is being computed) | rejected (cannot fit even alone,
        put in `rejected`) | full (no rows or blocks for it now)."""
        blocks = self.blocks
        if self.num_rows + 1 + len(seq.pending_children) > self.config.max_rows:
            return "full"
        hits, in_flight = blocks.lookup(seq) if not seq.scores_prompt else ([], 0)
        if (
            wait_for_prefix
            and 2 * in_flight * blocks.block_size >= seq.num_tokens - len(hits) * blocks.block_size
        ):
            return "postponed"
        cost = blocks.cost(seq, hits) + len(seq.pending_children) * blocks.fork_cost(seq)
        reserve = self.config.watermark_blocks if self.running else 0
        if cost > blocks.num_free - reserve:
            if not self.running and cost > blocks.num_free:
                self.rejected.append(seq)
                return "rejected"
            return "full"
        blocks.allocate(seq, hits)
        for child in seq.pending_children:
            blocks.share_prompt(seq, child)
        seq.is_running = True
        self.running.append(seq)
        return "admitted"

    def _schedule_prefills(self, now: float, scheduled: set[int]) -> list[tuple[Sequence, int]]:
        """Spend the prefill budget in priority order. While other prompts wait, no single prompt
        takes more than half of it, so a long prompt never holds the short ones back for all the
        steps it needs (and the short ones never stop it either)."""
        candidates = [s for s in self.running if s.seq_id not in scheduled and s.num_uncomputed >= 1]
        candidates.sort(key=lambda s: self._prefill_priority(s, now))
        budget = self.config.max_prefill_tokens
        rows: list[tuple[Sequence, int]] = []
        has_image = False
        for index, seq in enumerate(candidates):
            if budget <= 0:
                break
            share = budget if index == len(candidates) - 1 else max(budget // 2, min(budget, 16))
            take = self._chunk(seq, share, first=not rows, has_image=has_image)
            if take <= 0:
                continue
            rows.append((seq, take))
            budget -= take
            has_image = has_image or self._covers_images(seq, seq.num_cached, seq.num_cached + take)
        return rows

    def _prefill_priority(self, seq: Sequence, now: float) -> tuple:
        """Shortest job first (prompt left + max_tokens), so a short request does not wait behind
        long ones that came with it; a prompt that got nothing for `prefill_aging_s` goes first,
        by how long it has waited, so a stream of short requests never starves a long one."""
        if now - seq.last_progress > self.config.prefill_aging_s:
            return (0, seq.last_progress, seq.seq_id)
        return (1, seq.num_uncomputed + seq.max_tokens, seq.arrival, seq.seq_id)

    def _chunk(self, seq: Sequence, budget: int, *, first: bool, has_image: bool) -> int:
        """Tokens of `seq` to compute this step. A prompt span (image tokens, tokens that attend
        both ways) is computed in one chunk, one image chunk per step; such a chunk, or a whole
        prompt on a runner that cannot chunk, may exceed the budget only as the step's first
        prefill."""
        remaining = seq.num_uncomputed
        take = min(remaining, budget) if self.config.chunked_prefill else remaining
        span = seq.span
        start = seq.num_cached
        if span is not None and start <= span.last and start + take > span.first:
            through_span = span.last + 1 - start
            if (has_image and span.has_images) or (take < through_span and not first):
                if not self.config.chunked_prefill or start >= span.first:
                    return 0
                take = span.first - start  # the tokens before the span now, the span later
            elif take < through_span:
                take = through_span
            if (
                self.config.chunked_prefill
                and self._covers_images(seq, start, start + take)
                and start + take > seq.num_prompt_tokens
            ):
                # A preempted sequence computed again from its image on: the chunk with the pixels
                # ends with the prompt. Its generated tokens may hold the image placeholder, and the
                # model counts every placeholder in a pixel row against the image's features (one
                # too many: a 500 after the answer had half arrived).
                take = seq.num_prompt_tokens - start
        if take > budget and not first:
            return 0
        return take

    @staticmethod
    def _covers_images(seq: Sequence, start: int, end: int) -> bool:
        span = seq.span
        return span is not None and span.has_images and start <= span.first and end > span.last

    def _plan_row(self, seq: Sequence, take: int, plan: StepPlan) -> PlanRow:
        start, end = seq.num_cached, seq.num_cached + take
        row = PlanRow(
            seq.seq_id,
            seq.token_ids[start:end],
            start,
            seq.block_table,
            inputs=seq.inputs,
            # Side slots are filled from the images by the first row after they were taken, which
            # need not be the chunk of the image tokens (a prefix hit may cover those).
            with_images=self._covers_images(seq, start, end)
            or (bool(seq.side_table) and not seq.side_filled),
            seq_len=seq.num_tokens,
            side_blocks=seq.side_table,
        )
        if seq.scores_prompt:
            # Prompt tokens [first, last] are predicted by positions [first - 1, last - 1] of the chunk.
            first, last = max(seq.scored_until, start + 1), min(end, seq.num_prompt_tokens - 1)
            if first <= last:
                row.scoring = PromptScoring(
                    first - 1 - start, seq.token_ids[first : last + 1], seq.prompt_top
                )
        if end == seq.num_tokens:
            children = seq.pending_children
            row.samplers = [seq.sampler, *(child.sampler for child in children)]
            if children:
                self._forks[seq.seq_id] = children
                last = seq.block_table[(end - 1) // self.blocks.block_size]
                for child in children:
                    plan.forks.append((seq.seq_id, child.seq_id))
                    if end % self.blocks.block_size:
                        plan.copies.append((last, child.block_table[-1]))
        return row

    # -- advance -------------------------------------------------------------------------------
    def advance(
        self, plan: StepPlan, results: list[SampledToken], failed: Collection[int] = ()
    ) -> list[tuple[Sequence, SampledToken]]:
        """Record the executed `plan`: cached lengths, filled blocks, forks and sampled tokens.
        `results` has one entry per sampler of the plan, in order. Returns each sampling sequence
        with its draw (a None token means its logits were not finite: the caller fails it). The
        blocks of `failed` rows (ids) are never offered to prefix hits: their keys and values
        may never have been written, and a later prompt sharing the prefix would read them."""
        samples = iter(results)
        drawn: list[tuple[Sequence, SampledToken]] = []
        for row, seq in zip(plan.rows, self._rows, strict=True):
            seq.num_cached = row.end
            seq.last_progress = self._now
            seq.side_filled = True
            if row.scoring is not None:
                seq.scored_until = row.start + row.scoring.offset + 1 + len(row.scoring.targets)
            if seq.seq_id not in failed:
                self.blocks.register(seq)
            if not row.samplers:
                continue
            children = self._forks.pop(seq.seq_id, [])
            for child in children:
                child.num_cached = seq.num_cached
                child.block_keys = list(seq.block_keys)
                child.last_progress = self._now
                child.is_running = True
                self.running.append(child)
            seq.pending_children = []
            for sampled_seq in (seq, *children):
                sample = next(samples)
                if sample.token_id is not None:
                    sampled_seq.token_ids.append(sample.token_id)
                drawn.append((sampled_seq, sample))
        self._rows = []
        if self.config.long_rope_after is not None:
            for sampled_seq, _ in drawn:
                if sampled_seq.is_running and sampled_seq.cache_salt != self._rope_salt(sampled_seq):
                    self._recompute(sampled_seq)
        return drawn

    def _recompute(self, seq: Sequence) -> None:
        """The sequence just grew past `long_rope_after`: its keys were computed with the short
        scaling, so it gives them back and is computed again, first in line, with the long one
        (its new prefix-cache keys say so)."""
        self._release(seq)
        seq.cache_salt = self._rope_salt(seq)
        seq.block_keys = []
        seq._keys_cache = None
        self.preempted.appendleft(seq)

    def forget_step(self, plan: StepPlan) -> None:
        """The plan was not executed (the step failed): nothing it scheduled was computed. Forks
        it planned are undone; rows stay as they were and are scheduled again."""
        self._forks.clear()
        self._rows = []
