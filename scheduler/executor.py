"""One replica: a long-lived thread that loads the model and runs its step loop.

The loop reads as a sentence: collect → drop cancelled → admit → plan → step → emit → reap.
Admission and planning are bookkeeping over sequences; all tensor work is `runner.step`. Outputs
of a whole step cross to the event loop in one `deliver` call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from models.devices import DeviceScope
from models.errors import OverloadedError
from models.prompt import PreparedPrompt
from models.replica import ModelReplica
from models.sequence import Sequence, SequenceDelta
from scheduler.request import RequestStream

log = logging.getLogger(__name__)

# (stream, choice index, delta) for every sequence that produced something this step.
Delivery = list[tuple[RequestStream, int, SequenceDelta]]
GENERIC_FAILURE = "generation failed"
SHUTTING_DOWN = "the server is shutting down"
CACHE_FULL = "the request does not fit this replica's KV cache memory"


@dataclass(eq=False)
class Job:
    stream: RequestStream
    prepared: PreparedPrompt
    cost: int  # tokens of work, for routing
    seqs: list[Sequence] = field(default_factory=list)
    enqueued_at: float = field(default_factory=time.monotonic)

    @property
    def n(self) -> int:
        return self.stream.request.n


@dataclass(frozen=True)
class ExecutorConfig:
    max_queue_size: int = 256
    max_prefill_tokens: int = 512
    batch_timeout_s: float = 0.0
    prefill_aging_s: float = 2.0
    idle_poll_s: float = 0.5


class Executor:
    def __init__(self, name: str, device: str, build: Callable[[], ModelReplica], deliver: Callable[[Delivery], None], config: ExecutorConfig) -> None:
        self.name = name
        self.device = device
        self.config = config
        self.state = "loading"  # loading | ready | failed | stopped
        self.error: str | None = None
        self.replica: ModelReplica | None = None
        self.outstanding_tokens = 0  # maintained by the scheduler on the event loop
        self.num_running = 0
        self.steps = 0
        self._build = build
        self._deliver = deliver
        self._queue: deque[Job] = deque()
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
    def queue_depth(self) -> int:
        return len(self._queue)

    def has_room(self) -> bool:
        return len(self._queue) < self.config.max_queue_size

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._queue) >= self.config.max_queue_size:
                raise OverloadedError("the server is at capacity; retry shortly")
            self._queue.append(job)
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def stop(self) -> None:
        """Finish what is running, then end the thread; queued jobs are failed."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- replica thread ------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            with self._scope():
                self.replica = self._build()
        except BaseException as exc:
            log.error("replica %s failed to load: %s", self.name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            self.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.state = "failed"
            self._fail_queued("the model failed to load")
            return
        self.state = "ready"
        log.info("replica %s ready on %s (%s path)", self.name, self.device, self.replica.path)
        try:
            if self.replica.path == "fast":
                self._step_loop()
            else:
                self._sequential_loop()
        except BaseException:
            log.exception("replica %s stopped unexpectedly", self.name)
            self.state = "failed"
            self.error = "the replica's step loop crashed"
            self._fail_queued(GENERIC_FAILURE)
            raise
        finally:
            if self.state == "ready":
                self.state = "stopped"

    def _take(self, running: list[Job], limit: int) -> list[Job]:
        """Wait for work when idle; honour BATCH_TIMEOUT_MS so a burst can share one prefill."""
        with self._cond:
            while not self._queue and not running:
                if self._stopping:
                    return []
                self._cond.wait(self.config.idle_poll_s)
            timeout = self.config.batch_timeout_s
            if timeout > 0 and not running and self._queue and len(self._queue) < limit:
                deadline = self._queue[0].enqueued_at + timeout
                while len(self._queue) < limit and (remaining := deadline - time.monotonic()) > 0:
                    self._cond.wait(remaining)
            return list(self._queue)

    def _step_loop(self) -> None:
        runner = self.replica.runner
        running: list[Job] = []
        reserved = 0  # slots promised to children of n > 1 requests still prefilling
        while True:
            candidates = self._take(running, runner.free_slots)
            if self._stopping:
                self._shutdown(running, runner)
                return
            if not candidates and not running:
                continue
            self._drop_cancelled(running)
            reserved = self._admit(running, runner, reserved)
            decode, prefill = self._plan(running)
            if decode or prefill:
                with self._scope():
                    self._run_step(runner, decode, prefill)
                self.steps += 1
            reserved = self._emit_and_reap(running, runner)
            self.num_running = len(running)

    def _drop_cancelled(self, running: list[Job]) -> None:
        dropped: Delivery = []
        with self._cond:
            for job in [j for j in self._queue if j.stream.cancelled]:
                self._queue.remove(job)
                dropped.extend((job.stream, i, SequenceDelta(finish_reason="abort")) for i in range(job.n))
        for job in running:
            if job.stream.cancelled:
                for seq in job.seqs:
                    seq.abort("abort")
        if dropped:
            self._deliver(dropped)

    def _admit(self, running: list[Job], runner, reserved: int) -> int:
        while True:
            with self._cond:
                if not self._queue:
                    return reserved
                job = self._queue[0]
                if runner.free_slots - reserved < job.n:
                    return reserved
                self._queue.popleft()
            try:
                if not job.seqs:  # a job put back while waiting for cache room keeps its sequences
                    job.seqs = self.replica.new_sequences(job.prepared, job.stream.request.params, n=job.n, owner=job)
            except Exception:
                log.exception("could not start request %s", job.stream.request_id)
                self._deliver([(job.stream, i, SequenceDelta(finish_reason="error", error=GENERIC_FAILURE)) for i in range(job.n)])
                continue
            if not runner.can_admit(job.seqs[0], rows=job.n + reserved):
                # The KV cache budget is the limit now: wait for running sequences to finish (FIFO).
                if running:
                    with self._cond:
                        self._queue.appendleft(job)
                    return reserved
                log.warning("request %s does not fit the KV cache budget even alone", job.stream.request_id)
                self._deliver([(job.stream, i, SequenceDelta(finish_reason="error", error=CACHE_FULL)) for i in range(job.n)])
                continue
            parent, children = job.seqs[0], job.seqs[1:]
            parent.children = children
            runner.admit(parent)
            reserved += len(children)
            running.append(job)

    def _plan(self, running: list[Job]) -> tuple[list[Sequence], list[tuple[Sequence, int]]]:
        decode: list[Sequence] = []
        waiting: list[tuple[tuple, Sequence]] = []
        now = time.monotonic()
        for job in running:
            for seq in job.seqs:
                if seq.is_finished or seq.slot is None:
                    continue
                if not seq.is_prefilling:
                    decode.append(seq)
                else:
                    waiting.append((self._prefill_priority(job, seq, now), seq))
        waiting.sort(key=lambda item: item[0])

        budget = self.config.max_prefill_tokens
        prefill: list[tuple[Sequence, int]] = []
        has_images = False
        for _, seq in waiting:
            if budget <= 0:
                break
            remaining = seq.remaining_prompt
            if seq.mm_inputs and seq.num_cached == 0:
                # Image tokens cannot be split across chunks; one image prompt per step, whole.
                if has_images or (prefill and remaining > budget):
                    continue
                has_images = True
                take = remaining
            else:
                take = min(remaining, budget)
            prefill.append((seq, take))
            budget -= take
        return decode, prefill

    def _prefill_priority(self, job: Job, seq: Sequence, now: float) -> tuple:
        """Which prompt gets the prefill budget first. A prompt already partly cached finishes first
        (its cache is held anyway); then the shortest job (prompt left + max_tokens), so a short
        request does not wait behind long ones that arrived with it; a job waiting longer than
        `prefill_aging_s` goes by arrival order instead, so long jobs are never starved."""
        if seq.num_cached:
            return (0, job.enqueued_at)
        if now - job.enqueued_at > self.config.prefill_aging_s:
            return (1, job.enqueued_at)
        return (2, seq.remaining_prompt + seq.max_tokens, job.enqueued_at)

    def _run_step(self, runner, decode: list[Sequence], prefill: list[tuple[Sequence, int]]) -> None:
        try:
            runner.step(decode, prefill)
            return
        except Exception:
            log.exception("step failed on replica %s (%d decoding, %d prefilling)", self.name, len(decode), len(prefill))
        # One request must not take the batch down: newcomers are the likely cause, so fail them
        # and retry the running rows alone; if that fails too, fail those rows.
        for seq, _ in prefill:
            seq.abort("error", GENERIC_FAILURE)
            for child in getattr(seq, "children", ()):
                child.abort("error", GENERIC_FAILURE)
        if prefill and decode:
            try:
                runner.step(decode, [])
                return
            except Exception:
                log.exception("decode-only retry failed on replica %s", self.name)
        for seq in decode:
            seq.abort("error", GENERIC_FAILURE)

    def _emit_and_reap(self, running: list[Job], runner) -> int:
        delivery: Delivery = []
        reserved = 0
        for job in list(running):
            parent = job.seqs[0]
            if parent.is_finished:
                for child in getattr(parent, "children", ()):
                    if child.slot is None:
                        child.abort(parent.finish_reason if parent.finish_reason in ("abort", "error") else "abort", parent.error)
            for seq in job.seqs:
                delta = seq.take_delta()
                if delta is not None:
                    delivery.append((job.stream, seq.index, delta))
                if seq.is_finished and seq.slot is not None:
                    runner.release(seq)
            if all(seq.is_finished for seq in job.seqs):
                running.remove(job)
            elif parent.is_prefilling:
                reserved += sum(1 for child in job.seqs[1:] if child.slot is None)
        if delivery:
            self._deliver(delivery)
        return reserved

    def _sequential_loop(self) -> None:
        runner = self.replica.runner
        while True:
            self._take([], 1)
            if self._stopping:
                self._fail_queued(SHUTTING_DOWN)
                return
            self._drop_cancelled([])
            with self._cond:
                if not self._queue:
                    continue
                job = self._queue.popleft()
            self.num_running = 1
            try:
                job.seqs = self.replica.new_sequences(job.prepared, job.stream.request.params, n=job.n, owner=job)
                for seq in job.seqs:
                    self._run_sequential(runner, job, seq)
            except Exception:
                log.exception("could not start request %s", job.stream.request_id)
                for i in range(job.n):
                    if i >= len(job.seqs) or not job.seqs[i].is_finished:
                        self._deliver([(job.stream, i, SequenceDelta(finish_reason="error", error=GENERIC_FAILURE))])
            self.num_running = 0

    def _run_sequential(self, runner, job: Job, seq: Sequence) -> None:
        def emit() -> None:
            delta = seq.take_delta()
            if delta is not None:
                self._deliver([(job.stream, seq.index, delta)])

        if job.stream.cancelled:
            seq.abort("abort")
        else:
            try:
                with self._scope():
                    runner.run(seq, on_token=emit, cancelled=lambda: job.stream.cancelled or self._stopping)
            except Exception:
                log.exception("generation failed for request %s", job.stream.request_id)
                seq.abort("error", GENERIC_FAILURE)
        emit()
        self.steps += 1

    def _shutdown(self, running: list[Job], runner) -> None:
        for job in running:
            for seq in job.seqs:
                seq.abort("error", SHUTTING_DOWN)
        self._emit_and_reap(running, runner)
        self._fail_queued(SHUTTING_DOWN)

    def _fail_queued(self, message: str) -> None:
        with self._cond:
            jobs = list(self._queue)
            self._queue.clear()
        for job in jobs:
            self._deliver([(job.stream, i, SequenceDelta(finish_reason="error", error=message)) for i in range(job.n)])
