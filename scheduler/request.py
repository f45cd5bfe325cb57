"""Requests in flight: what the app submits and what it reads back.

An `EngineRequest` is built by `app/translate.py` (the only place that sees wire types). The
scheduler answers with a `RequestStream`: an async iterator of `StreamUpdate`s, one per hand-off
from the replica. Its collector coalesces everything a slow reader has not consumed yet, so the
replica never waits for a client.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from models.errors import EngineError
from models.params import GrammarSpec, PromptInput, SamplingParams
from models.sampling import TokenLogprob

if TYPE_CHECKING:
    from models.prompt import PreparedPrompt

__all__ = [
    "ChoiceUpdate",
    "EngineRequest",
    "GrammarSpec",
    "PromptInput",
    "RequestStream",
    "SamplingParams",
    "StreamUpdate",
    "TokenLogprob",
]


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt: PromptInput
    params: SamplingParams
    n: int = 1
    kind: str = "chat"  # chat | completion | generate, for logs and metrics
    # False: the client reads the answer whole, so the replica hands over the request's first
    # tokens (time to first token stays exact), then each choice's rest when that choice ends,
    # instead of waking the event loop at every step for text nobody reads before the end.
    streamed: bool = True
    # What the app layer changed in or ignored of the request, said with the answer
    # (X-Request-Warnings, `warnings`), before what the prompt builder and the scheduler add.
    warnings: tuple[str, ...] = ()


@dataclass(slots=True)
class ChoiceUpdate:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass(slots=True)
class StreamUpdate:
    choices: list[ChoiceUpdate]
    error: EngineError | None = None  # set when the request failed after it started


class RequestStream:
    """Per-request output collector (loop side). Iterate it to receive updates."""

    def __init__(self, request: EngineRequest, prepared: PreparedPrompt) -> None:
        self.request = request
        self.request_id = request.request_id
        self.prompt_tokens = len(prepared.token_ids)
        self.num_images = prepared.num_images
        self.num_image_tokens = prepared.num_image_tokens
        self.warnings = [*request.warnings, *prepared.warnings]
        # The tokens kept of a prompt cut to max_input_tokens: an echo repeats what the model saw.
        self.kept_prompt_ids = list(prepared.token_ids) if prepared.truncated_tokens else None
        self.completion_tokens = 0
        self.created = time.time()
        self.scheduled_at: float | None = None  # first in a step's plan (set by the replica thread)
        self.cached_tokens = 0  # prompt tokens the prefix cache held when it was first scheduled
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._last_token_at: dict[int, float] = {}  # per choice
        # Inter-token latency: seconds per token (to 0.1 ms) of each delivery after the first ->
        # how many tokens came that way. A dict stays small however long the answer.
        self.token_intervals: dict[float, int] = {}
        self.replica_name = ""
        # Prompt logprobs (computed once for all choices): the first token's logprob is None.
        self.prompt_logprobs: list[TokenLogprob] = []
        self.finish_reasons: list[str] = []  # how each choice ended, in the order they did
        self.cancelled = False  # read by the replica thread between steps
        self._pending: dict[int, ChoiceUpdate] = {}
        self._open_choices = set(range(request.n))
        self._error: EngineError | None = None
        self._wakeup = anyio.Event()
        self._on_cancel: Any = None

    # -- replica -> loop -----------------------------------------------------------------------
    def push(
        self,
        index: int,
        text: str,
        token_ids: list[int],
        logprobs: list[TokenLogprob],
        finish_reason: str | None,
        error: EngineError | None,
        prompt_logprobs: list[TokenLogprob] | None = None,
    ) -> None:
        if prompt_logprobs:
            self.prompt_logprobs.extend(prompt_logprobs)
        update = self._pending.get(index)
        if update is None:
            update = self._pending[index] = ChoiceUpdate(index)
        update.text += text
        update.token_ids.extend(token_ids)
        update.logprobs.extend(logprobs)
        self.completion_tokens += len(token_ids)
        if token_ids:
            now = time.monotonic()
            if self.first_token_at is None:
                self.first_token_at = now
            # Intervals per choice: with one clock per request, n choices stepping together gave
            # n - 1 intervals of ~0 a step, and the mean inter-token latency came out n times low.
            last = self._last_token_at.get(index)
            if last is not None:
                interval = round((now - last) / len(token_ids), 4)
                self.token_intervals[interval] = self.token_intervals.get(interval, 0) + len(token_ids)
            elif len(token_ids) > 1 and self.first_token_at < now:
                # A choice held back from its first token (a non-streamed n > 1 answer arrives
                # whole) got that token with the request's first: one prefill samples every choice.
                interval = round((now - self.first_token_at) / (len(token_ids) - 1), 4)
                self.token_intervals[interval] = self.token_intervals.get(interval, 0) + len(token_ids) - 1
            self._last_token_at[index] = now
        if finish_reason is not None:
            update.finish_reason = finish_reason
            self.finish_reasons.append(finish_reason)
            self._open_choices.discard(index)
            if error and self._error is None:
                self._error = error
            if not self._open_choices:
                self.finished_at = time.monotonic()
        self._wakeup.set()

    @property
    def finished(self) -> bool:
        return not self._open_choices

    @property
    def exhausted(self) -> bool:
        """Finished, and every update read: what a reader may stop at. (Finished alone is not:
        the last update can arrive while the reader is at an await between two reads, as a
        completions stream is while it sends the echo, which then lost the answer's tail.)"""
        return not self._open_choices and not self._pending

    # -- reader --------------------------------------------------------------------------------
    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamUpdate:
        while not self._pending:
            if not self._open_choices:
                raise StopAsyncIteration
            self._wakeup = anyio.Event()
            await self._wakeup.wait()
        choices = [self._pending[i] for i in sorted(self._pending)]
        self._pending = {}
        # A choice's failure is the request's (a stream ends at it): its own error goes with the
        # update that reports it, not a generic one while the other choices are still open.
        return StreamUpdate(choices, self._error)

    def cancel(self) -> None:
        """The client is gone (disconnect, timeout): free the batch slot at the next step."""
        if not self.cancelled and not self.finished:
            self.cancelled = True
            if self._on_cancel is not None:
                self._on_cancel(self)
