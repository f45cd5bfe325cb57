"""What a replica's executor is handed: each request as a job, and its configuration."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from models.generation import Delta
from models.prompt import PreparedPrompt
from scheduler.request import RequestStream
from scheduler.sequence import Sequence

# (stream, choice index, delta) for every choice that produced something this step.
Delivery = list[tuple[RequestStream, int, Delta]]


@dataclass(eq=False)
class Job:
    stream: RequestStream
    prepared: PreparedPrompt
    cost: int  # tokens of work, for routing
    enqueued_at: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    first_tokens_sent: bool = False

    @property
    def holds_deltas(self) -> bool:
        """Whether its unfinished choices' new tokens wait in the replica (a client reading the
        answer whole, whose first tokens went out already)."""
        return self.first_tokens_sent and not self.stream.request.streamed

    def keeps_back(self, seq: Sequence, stream_interval: int) -> bool:
        """Whether `seq`'s new tokens stay in the replica this step: held for a client reading the
        answer whole, or gathered for a stream until `stream_interval` of them (after its first
        token, sent at once); never once the choice has ended."""
        if seq.is_finished or seq.output.is_finished:
            return False
        if self.holds_deltas:
            return True
        return (
            stream_interval > 1
            and self.stream.request.streamed
            and seq.num_generated > 1
            and seq.output.pending_tokens < stream_interval
        )

    @property
    def n(self) -> int:
        return self.stream.request.n

    @property
    def finished(self) -> bool:
        return bool(self.seqs) and all(seq.is_finished for seq in self.seqs)


@dataclass(frozen=True)
class ExecutorConfig:
    """Built from the server's Settings (`app.lifespan.scheduler_config`), which hold the defaults."""

    max_batch_size: int  # rows: sequences decoded together
    max_queue_size: int
    max_prefill_tokens: int
    batch_timeout_s: float
    prefill_aging_s: float = 2.0
    idle_poll_s: float = 0.5
    stream_interval: int = 1  # tokens a streamed choice gathers per hand-off after its first
