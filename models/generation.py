"""What one choice has generated: its sampler, text so far, stop rules, and the delta not yet
handed to the request's stream.

Owned by one replica thread. The executor calls `append()` with each sampled token and drains
`take_delta()` once per step; where the tokens' keys live is the scheduler's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models.detokenize import IncrementalDetokenizer, StopStringMatcher
from models.errors import EngineError, GenerationError, InvalidRequestError
from models.grammar_errors import clean_error
from models.sampling import RowSampler, TokenLogprob


@dataclass(slots=True)
class Delta:
    """What a choice produced since the last hand-off."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: EngineError | None = None
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)


class Generation:
    def __init__(self, sampler: RowSampler, detokenizer: IncrementalDetokenizer, *, max_tokens: int) -> None:
        self.sampler = sampler
        self.max_tokens = max_tokens
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.error: EngineError | None = None
        self._detok = detokenizer
        self._stops = StopStringMatcher(sampler.params.stop)
        self._delta = Delta()

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def pending_tokens(self) -> int:
        """Tokens appended since the last hand-off."""
        return len(self._delta.token_ids)

    def take_delta(self) -> Delta | None:
        delta = self._delta
        if not (delta.token_ids or delta.text or delta.finish_reason or delta.prompt_logprobs):
            return None
        self._delta = Delta()
        return delta

    def add_prompt_logprobs(self, entries: list[TokenLogprob]) -> None:
        """Logprobs of prompt tokens, in order (the first token's is None: nothing predicts it),
        named like the generated tokens' so that the HTTP layer needs no tokenizer."""
        for entry in entries:
            texts, raw = self._detok.token_texts_and_bytes([entry.token_id, *(t for t, _ in entry.top)])
            entry.token, entry.top_tokens = texts[0], texts[1:]
            entry.token_bytes, entry.top_token_bytes = raw[0], raw[1:]
        self._delta.prompt_logprobs.extend(entries)

    def append(self, token_id: int, logprob: TokenLogprob | None) -> None:
        if self.max_tokens == 0:
            # Scoring only (echo with max_tokens 0): the prompt was computed, nothing is generated.
            self._finish("length", flush_text=False)
            return
        self.output_ids.append(token_id)
        self.sampler.accept(token_id)
        delta = self._delta
        delta.token_ids.append(token_id)
        if logprob is not None:
            texts, raw = self._detok.token_texts_and_bytes([token_id, *(t for t, _ in logprob.top)])
            logprob.token, logprob.top_tokens = texts[0], texts[1:]
            logprob.token_bytes, logprob.top_token_bytes = raw[0], raw[1:]
            delta.logprobs.append(logprob)
        if token_id in self.sampler.stop_ids and self.sampler.num_generated >= self.sampler.params.min_tokens:
            constraint = self.sampler.constraint
            if constraint is not None and constraint.error:
                # The grammar refused the end token: the text does not match it, and is not
                # returned as if it did.
                self.abort("error", _constraint_failure(constraint))
                return
            # Stop tokens end the text; their own text is never part of the answer.
            self._finish("stop", flush_text=True)
            return
        text = self._detok.push(token_id)
        if self.sampler.num_generated < self.sampler.params.min_tokens:
            # As in vLLM, min_tokens holds stop strings off too, not only stop tokens and EOS.
            hit_stop = False
        else:
            text, hit_stop = self._stops.feed(text)
        self._emit(text)
        if hit_stop:
            self._finish("stop", flush_text=False)
        elif self.sampler.constraint is not None and self.sampler.constraint.is_finished():
            # Checked before the length: output that completes its grammar on the last allowed
            # token is whole, not cut.
            if self.sampler.constraint.error:
                self.abort("error", _constraint_failure(self.sampler.constraint))
            else:
                self._finish("stop", flush_text=True)
        elif len(self.output_ids) >= self.max_tokens:
            self._finish("length", flush_text=True)

    def abort(self, reason: str = "abort", error: EngineError | None = None) -> None:
        if self.finish_reason is None:
            self.error = error
            self._delta.error = error
            self._finish(reason, flush_text=False)

    def _emit(self, text: str) -> None:
        if text:
            self._delta.text += text

    def _finish(self, reason: str, *, flush_text: bool) -> None:
        if flush_text:
            tail = self._detok.flush()  # a stop token was never pushed: its text is not owed
            text, hit = self._stops.feed(tail)
            self._emit(text)
            if not hit:
                self._emit(self._stops.flush())
        self.finish_reason = reason
        self._delta.finish_reason = reason


def _constraint_failure(constraint) -> EngineError:
    """Why a constrained row stopped. llguidance's limits (Earley items, lexer fuel) are hit by
    grammars that cannot end (a schema whose required property contains itself, a rule with no
    base case) where validation's look at the first tokens did not reach: the request's grammar
    is at fault, a 400 naming its field. Anything else (a token the mask allowed and the
    grammar then rejected) is the server's failure: the output is no longer guaranteed."""
    error = clean_error(constraint.error or "")
    # "... limit ...", "Too many items (limit N)", and the Earley row's "Current row has N items;
    # max is 2000" (an object of some 500 optional properties reaches it at its first key).
    if "limit" in error or "max is" in error or "too many" in error.lower():
        return InvalidRequestError(
            f"the grammar from {constraint.param} could not be followed: {error} (it exceeds the grammar "
            "engine's limits: a schema that requires itself, a grammar with no end, or an object with "
            "hundreds of optional properties)",
            param=constraint.param,
        )
    return GenerationError("constrained decoding failed")
