"""One replica: a long-lived thread that loads the model and runs its step loop.

The loop reads as a sentence: collect new requests -> drop cancelled ones -> schedule -> run ->
advance -> emit. `scheduler.batch` decides what each step computes (pure bookkeeping), the
replica's runner computes it, and the step's outputs cross to the event loop in one `deliver`
call that never blocks on the loop (the GIL it may wait for after is the `handoff` timing).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from models.devices import DeviceScope, trim_host_memory
from models.errors import (
    ContextLengthExceededError,
    EngineError,
    GenerationError,
    ModelNotReadyError,
    OverloadedError,
    ShuttingDownError,
)
from models.generation import Delta
from models.plan import SampledToken, StepPlan
from models.replica import ModelReplica
from scheduler.batch import Batch, BatchConfig
from scheduler.blocks import BlockManager
from scheduler.failures import (
    CACHE_FULL,
    GENERIC_FAILURE,
    REPLICA_STOPPED,
    SHUTTING_DOWN,
    STEP_LOOP_CRASHED,
    sampling_failure,
)
from scheduler.job import Delivery, ExecutorConfig, Job
from scheduler.sequence import Sequence
from scheduler.threads import name_os_thread
from scheduler.timings import StepTimings

log = logging.getLogger(__name__)


class Executor:
    def __init__(
        self,
        name: str,
        device: str,
        build: Callable[[], ModelReplica],
        deliver: Callable[[Delivery], None],
        config: ExecutorConfig,
    ) -> None:
        self.name = name
        self.device = device
        self.config = config
        self.state = "loading"  # loading | ready | failed | stopped
        self.error: str | None = None
        self.replica: ModelReplica | None = None
        self.batch: Batch | None = None
        # The work of the requests queued here as admitted (prompt plus every choice's max_tokens,
        # maintained by the scheduler on the event loop), and how much of it the replica has done
        # (its running requests' computed prompts and generated tokens, each step).
        self.outstanding_tokens = 0
        self.work_done = 0
        self.num_running = 0  # sequences in the batch (rows taken), updated once per step
        self.num_waiting = 0  # sequences on the replica thread not admitted yet (n per request)
        self.work_per_s = 0.0  # tokens computed per second (prompt and generated), smoothed: Retry-After
        self.steps = 0
        self._snapshot: dict = {}  # batch figures, replaced (never mutated) by the replica thread each step
        self.timings = StepTimings()
        self._idle_trimmed = True
        self._build = build
        self._deliver = deliver
        self._inbox: deque[Job] = deque()
        self._inbox_sequences = 0
        # Set once the thread will never collect again: a job submitted after its inbox was failed
        # would wait in it forever (the loop checks readiness first, but a crash can fall between).
        self._closed: Callable[[], EngineError] | None = None
        self._jobs: list[Job] = []  # requests on the replica thread (waiting or running)
        self._unscheduled: list[Job] = []  # of those, the ones no step has included yet
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name=f"replica-{name}", daemon=True)
        self._scope = DeviceScope(device)

    # -- event loop side -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def is_ready(self) -> bool:
        return self.state == "ready" and not self._stopping

    @property
    def crashed(self) -> bool:
        """It served, then its step loop died: only a restart brings it back."""
        return self.state == "failed" and self.error == STEP_LOOP_CRASHED

    @property
    def block_manager(self) -> BlockManager | None:
        """The KV block books once serving (the router reads its prefix cache), else None."""
        return self.batch.blocks if self.batch is not None and self.state == "ready" else None

    @property
    def remaining_tokens(self) -> int:
        """Tokens of work left in the requests queued here: what the router ranks replicas by."""
        return max(0, self.outstanding_tokens - self.work_done)

    @property
    def queue_depth(self) -> int:
        """Sequences not yet in the batch (n per request): in the inbox or waiting for rows and
        blocks. A request with n = 16 or 16 prompts counts 16."""
        return self._inbox_sequences + self.num_waiting

    @property
    def room(self) -> int:
        """Sequences this replica takes now: its free rows (the next step fills them), then
        MAX_QUEUE_SIZE waiting (a burst into free rows was refused by a small queue)."""
        return self.config.max_queue_size + self._free_rows - self.queue_depth

    def has_room(self, sequences: int = 1) -> bool:
        return sequences <= self.room

    def waits(self, sequences: int = 1) -> bool:
        """Whether `sequences` more would have to wait for rows (the batch as of the last step)."""
        return self.queue_depth + sequences > self._free_rows

    @property
    def _free_rows(self) -> int:
        return max(0, self.config.max_batch_size - self.num_running)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed is not None:
                raise self._closed()
            if not self.has_room(job.n):
                raise OverloadedError("the server is at capacity; retry shortly")
            self._inbox.append(job)
            self._inbox_sequences += job.n
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def stop(self) -> None:
        """End the thread at the next step; whatever is still running or queued is failed."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def fits(self, prompt_tokens: int, max_tokens: int, n: int) -> bool:
        """Whether a request can ever run here: its worst case (every choice at max_tokens) in KV
        blocks, the choices sharing the full blocks of the prompt."""
        replica = self.replica
        size = replica.block_size
        whole = -(-(prompt_tokens + max_tokens) // size)
        return whole + (n - 1) * (whole - prompt_tokens // size) <= replica.num_blocks

    def max_tokens_that_fit(self, prompt_tokens: int, n: int) -> int:
        """The largest max_tokens whose worst case `fits` (0 or less: not even one token)."""
        replica = self.replica
        size = replica.block_size
        shared = prompt_tokens // size  # the prompt's full blocks, shared by the choices
        whole = (replica.num_blocks + (n - 1) * shared) // n  # each choice's blocks, at most
        return whole * size - prompt_tokens

    def stats(self) -> dict:
        """For /health and /metrics (event loop): the batch as of the last step."""
        return {
            "running": self.num_running,
            "queued": self.queue_depth,
            "steps": self.steps,
            **self._snapshot,
            "step_ms": self.timings.recent(),
        }

    # -- replica thread ------------------------------------------------------------------------
    def _main(self) -> None:
        name_os_thread(self._thread.name)  # before torch starts its workers from this thread
        try:
            with self._scope():
                self.replica = self._build()
        except BaseException as exc:
            debug = log.isEnabledFor(logging.DEBUG)
            log.error("replica %s failed to load: %s", self.name, exc, exc_info=debug)
            self.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.state = "failed"
            self._fail_inbox(lambda: ModelNotReadyError("the model failed to load; see the server log"))
            return
        self.attach(self.replica)
        log.info("replica %s ready on %s (%s path)", self.name, self.device, self.replica.path)
        try:
            while self._wait_for_work():
                self.step()
            self._fail_everything(ShuttingDownError(SHUTTING_DOWN), lambda: ShuttingDownError(SHUTTING_DOWN))
        except BaseException:
            log.exception("replica %s stopped unexpectedly", self.name)
            self.state = "failed"
            self.error = STEP_LOOP_CRASHED
            # Requests that got nothing yet are 503s to retry: the other replicas still serve.
            self._fail_everything(GenerationError(GENERIC_FAILURE), lambda: OverloadedError(REPLICA_STOPPED))
        finally:
            if self.state == "ready":
                self.state = "stopped"

    def attach(self, replica: ModelReplica) -> None:
        """Serve with a loaded replica: its batch gets the replica's KV pool geometry. (Tests
        attach a replica they built and call `step()` themselves, without the thread.)"""
        self.replica = replica
        self.batch = Batch(
            BatchConfig(
                max_rows=self.config.max_batch_size,
                max_prefill_tokens=self.config.max_prefill_tokens,
                chunked_prefill=replica.runner.chunked_prefill,
                prefill_aging_s=self.config.prefill_aging_s,
                watermark_blocks=max(1, replica.num_blocks // 100),
                long_rope_after=replica.runner.long_rope_after,
            ),
            BlockManager(
                replica.num_blocks, replica.block_size, enable_prefix_caching=replica.prefix_caching
            ),
        )
        self._snapshot = self.batch.figures()
        self.state = "ready"

    def _wait_for_work(self) -> bool:
        """Block while there is nothing to do; honour BATCH_TIMEOUT_MS so a burst arriving at an
        idle replica shares one prefill step. False once the replica is stopping."""
        with self._cond:
            while not self._inbox and not self.batch.has_work and not self._stopping:
                self._cond.wait(self.config.idle_poll_s)
            timeout = self.config.batch_timeout_s
            if timeout > 0 and self._inbox and not self.batch.running:
                deadline = self._inbox[0].enqueued_at + timeout
                while (
                    len(self._inbox) < self.batch.config.max_rows
                    and (remaining := deadline - time.monotonic()) > 0
                ):
                    self._cond.wait(remaining)
            return not self._stopping

    def step(self) -> None:
        """One iteration: collect -> drop cancelled -> schedule -> run -> advance -> emit."""
        batch = self.batch
        clock = time.perf_counter
        began = clock()
        self._collect()
        self._drop_cancelled()
        plan = batch.schedule()
        self._fail_rejected()
        scheduled = executed = advanced = clock()
        if plan is not None:
            self._mark_scheduled()
        if plan is not None:
            results, failed = self._run(plan)
            executed = clock()
            self._advance(plan, results, failed)
            advanced = clock()
            if plan.rows:
                self.steps += 1
                self._idle_trimmed = False
                rate = plan.num_tokens / max(executed - scheduled, 1e-6)
                self.work_per_s = rate if not self.work_per_s else 0.8 * self.work_per_s + 0.2 * rate
        elif batch.has_work:  # nothing runnable (a bug if it happens): do not spin
            log.warning("replica %s has work but nothing to schedule", self.name)
            time.sleep(self.config.idle_poll_s)
        handoff = self._emit()
        if plan is not None and plan.rows:
            runner_split = getattr(self.replica.runner, "last_split", None) or {}
            self.timings.add(
                rows=len(plan.rows),
                schedule=scheduled - began,
                execute=executed - scheduled,
                postprocess=advanced - executed,
                emit=clock() - advanced,
                handoff=handoff,
                **runner_split,
            )
        if not batch.has_work and not self._idle_trimmed:
            # The burst is over: give its transient memory back (the KV pool itself is fixed).
            trim_host_memory()
            self._idle_trimmed = True

    def _mark_scheduled(self) -> None:
        """When each request first got into a step (its queue time ends there). Only requests
        not yet scheduled are looked at, so a full batch costs nothing here."""
        if not self._unscheduled:
            return
        now = time.monotonic()
        waiting = []
        for job in self._unscheduled:
            running = [seq for seq in job.seqs if seq.is_running]
            if running:
                job.stream.scheduled_at = now
                # Admitted this step, nothing computed yet: what it holds came from the prefix cache.
                job.stream.cached_tokens = running[0].num_cached
            elif not all(seq.is_finished for seq in job.seqs):  # ended unscheduled: no queue time
                waiting.append(job)
        self._unscheduled = waiting

    def _collect(self) -> None:
        """Move new requests into the batch."""
        with self._cond:
            jobs = list(self._inbox)
            self._inbox.clear()
            self._inbox_sequences = 0
            self.num_waiting += sum(job.n for job in jobs)
        for job in jobs:
            if job.stream.cancelled:
                self._deliver([(job.stream, i, Delta(finish_reason="abort")) for i in range(job.n)])
                self.num_waiting -= job.n
                continue
            try:
                job.seqs = job.make_sequences(self.replica)
                self.batch.add(job.seqs)
            except Exception:
                log.exception("could not start request %s", job.stream.request_id)
                self._deliver(
                    [
                        (job.stream, i, Delta(finish_reason="error", error=GenerationError(GENERIC_FAILURE)))
                        for i in range(job.n)
                    ]
                )
                self.num_waiting -= job.n
                continue
            self._jobs.append(job)
            self._unscheduled.append(job)

    def _drop_cancelled(self) -> None:
        for job in self._jobs:
            if job.stream.cancelled:
                for seq in job.seqs:
                    if not seq.is_finished:
                        self._finish(seq, "abort")

    def _fail_rejected(self) -> None:
        batch = self.batch
        while batch.rejected:
            parent = batch.rejected.pop()
            log.warning("request %s does not fit the KV cache even alone", parent.group.stream.request_id)
            for seq in [parent, *parent.pending_children]:
                seq.output.abort("error", ContextLengthExceededError(CACHE_FULL, param="max_tokens"))
            batch.finish(parent)

    def _finish(self, seq: Sequence, reason: str, error: EngineError | None = None) -> None:
        """End `seq` (and choices waiting to fork from it) with `reason` and leave the batch."""
        for gone in self.batch.finish(seq):
            gone.output.abort(reason, error)

    def _run(self, plan: StepPlan) -> tuple[list[SampledToken], dict[int, str]]:
        """Execute the plan. If the step fails, each row runs alone so that one bad request
        fails alone: a row that fails by itself is reported in the second value (seq_id -> error)."""
        runner = self.replica.runner
        try:
            with self._scope():
                return runner.execute(plan), {}
        except Exception:
            log.exception(
                "step failed on replica %s (%d rows); retrying each row alone", self.name, len(plan.rows)
            )
        results: list[SampledToken] = []
        failed: dict[int, str] = {}
        for index, row in enumerate(plan.rows):
            alone = StepPlan(
                rows=[row],
                copies=[c for c in plan.copies if c[0] in row.block_table],
                forks=[f for f in plan.forks if f[0] == row.seq_id],
                released=plan.released if index == 0 else [],
                fresh_blocks=plan.fresh_blocks if index == 0 else [],
            )
            try:
                with self._scope():
                    results.extend(runner.execute(alone))
            except Exception:
                log.exception("request row %d failed alone on replica %s", row.seq_id, self.name)
                failed[row.seq_id] = GENERIC_FAILURE
                results.extend(SampledToken(None, None, GENERIC_FAILURE) for _ in row.samplers)
        return results, failed

    def _advance(self, plan: StepPlan, results: list[SampledToken], failed: dict[int, str]) -> None:
        batch = self.batch
        scored = {row.seq_id: row.scoring.results for row in plan.rows if row.scoring is not None}
        unnamed: set[int] = set()  # prompt logprobs whose texts failed: ended once the step is recorded
        if scored:
            for seq in batch.running:
                if scored.get(seq.seq_id):
                    try:
                        seq.output.add_prompt_logprobs(scored[seq.seq_id])
                    except Exception:
                        log.exception("request row %d failed naming its prompt logprobs", seq.seq_id)
                        unnamed.add(seq.seq_id)
        for seq, sample in batch.advance(plan, results, failed):
            if seq.is_finished or seq.seq_id in unnamed:
                continue
            generation = seq.output
            if sample.token_id is None:
                self._finish(seq, "error", sampling_failure(seq, sample))
                continue
            try:
                generation.append(sample.token_id, sample.logprob)
            except Exception:  # its detokenizer or stop rules: this choice fails, not the replica
                log.exception("request row %d failed after sampling on replica %s", seq.seq_id, self.name)
                self._finish(seq, "error", GenerationError(GENERIC_FAILURE))
                continue
            if generation.is_finished:
                batch.finish(seq)
        if unnamed:
            failed = failed | dict.fromkeys(unnamed, GENERIC_FAILURE)
        if failed:
            for seq in list(batch.running):
                if seq.seq_id in failed:
                    self._finish(seq, "error", GenerationError(failed[seq.seq_id]))

    def _emit(self) -> float:
        """Hand every new delta of this step to the event loop at once. Returns the seconds the
        hand-off took: it should be microseconds, but the event loop wakes at once and can take the
        GIL for its whole burst of work (one wake-up and write per stream) while this thread waits."""
        delivery: Delivery = []
        still: list[Job] = []
        interval = self.config.stream_interval
        done = 0
        for job in self._jobs:
            for seq in job.seqs:
                if job.keeps_back(seq, interval):
                    continue
                delta = seq.output.take_delta()
                if delta is not None:
                    delivery.append((job.stream, seq.index, delta))
                    job.first_tokens_sent = job.first_tokens_sent or bool(delta.token_ids)
            if not job.finished:
                still.append(job)
                seqs = job.seqs
                computed = min(seqs[0].num_cached, len(job.prepared.token_ids)) - job.credit
                done += max(0, computed) + sum(s.num_generated for s in seqs)
        self._jobs = still
        self.work_done = done
        # The batch's own books: counted from the jobs, a preempted sequence that had generated
        # was in neither figure (a replica short of blocks looked free, and MAX_QUEUE_SIZE was
        # passed), and an n > 1 request's choices reserved for its fork were in both (a 503 for
        # a request that fit).
        self.num_waiting = self.batch.num_waiting
        self.num_running = self.batch.num_rows
        self._snapshot = self.batch.figures()
        if not delivery:
            return 0.0
        began = time.perf_counter()
        self._deliver(delivery)
        return time.perf_counter() - began

    def _fail_everything(self, error: EngineError, unstarted: Callable[[], EngineError]) -> None:
        """End every request here: those with tokens out with `error`, the others (nothing sent
        yet: a client may simply retry) with `unstarted()`, as the inbox and later submissions."""
        endings: list[tuple[Job, Sequence, EngineError]] = []
        for job in self._jobs:
            # A client reading the answer whole has had nothing yet, whatever was generated.
            generated = job.first_tokens_sent or any(seq.num_generated for seq in job.seqs)
            started = generated and job.stream.request.streamed
            reason = error if started else unstarted()
            endings += [(job, seq, reason) for seq in job.seqs if not seq.is_finished]
        try:
            if self.batch is not None:
                for _job, seq, reason in endings:
                    self._finish(seq, "error", reason)
                self._emit()
                self.replica.runner.release(self.batch.take_released())
        except Exception:
            # The batch's books may be what broke the loop: every request still gets its answer.
            log.exception(
                "replica %s could not wind its batch down; answering its requests directly", self.name
            )
            # Every choice of every job: one finished by the last step may not have been handed over.
            reasons = {id(job): reason for job, _seq, reason in endings}
            self._deliver(
                [
                    (job.stream, seq.index, Delta(finish_reason="error", error=reasons.get(id(job), error)))
                    for job in self._jobs
                    for seq in job.seqs
                ]
            )
        finally:
            self._fail_inbox(unstarted)

    def _fail_inbox(self, refusal: Callable[[], EngineError]) -> None:
        """Fail what waits in the inbox with `refusal()`, and every later submission."""
        with self._cond:
            self._closed = refusal
            jobs = list(self._inbox)
            self._inbox.clear()
            self._inbox_sequences = 0
        for job in jobs:
            error = refusal()
            self._deliver([(job.stream, i, Delta(finish_reason="error", error=error)) for i in range(job.n)])
