"""What a replica's executor is handed: each request as a job, and its configuration."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from models.generation import Delta
from models.prompt import PreparedPrompt
from models.replica import ModelReplica
from scheduler.request import RequestStream, TokenLogprob
from scheduler.sequence import PromptSpan, Sequence

# (stream, choice index, delta) for every choice that produced something this step.
Delivery = list[tuple[RequestStream, int, Delta]]


def prompt_span(prepared: PreparedPrompt) -> PromptSpan | None:
    """The positions of `prepared` computed in one chunk (its images), as its sequences carry them."""
    if prepared.unsplit_span is None:
        return None
    first, last = prepared.unsplit_span
    return PromptSpan(first, last, prepared.span_digest, has_images=prepared.num_images > 0)


@dataclass(eq=False)
class Job:
    stream: RequestStream
    prepared: PreparedPrompt
    cost: int  # tokens of work, for routing
    credit: int = 0  # prompt tokens the replica's prefix cache held when it was routed (not in cost)
    enqueued_at: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    first_tokens_sent: bool = False

    def make_sequences(self, replica: ModelReplica) -> list[Sequence]:
        """One sequence per choice, each with its own sampler and output, for `replica`."""
        prepared, params = self.prepared, self.stream.request.params
        generations = replica.generations(prepared, params, n=self.n)
        inputs = replica.sequence_inputs(prepared)
        span = prompt_span(prepared)
        if params.prompt_logprobs is not None:
            # Nothing predicts the first prompt token: its entry has no logprob, only its text.
            generations[0].add_prompt_logprobs([TokenLogprob(prepared.token_ids[0], None, [])])
        return [
            Sequence(
                prepared.token_ids,
                max_tokens=params.max_tokens,
                arrival=self.enqueued_at,
                group=self,
                index=index,
                origin=self.stream.request_id,
                sampler=generation.sampler,
                output=generation,
                span=span,
                inputs=inputs,
                side_tokens=inputs.side_tokens if inputs is not None else 0,
                # The first choice computes the prompt; the others fork from it once it is done.
                prompt_top=params.prompt_logprobs if index == 0 else None,
            )
            for index, generation in enumerate(generations)
        ]

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
