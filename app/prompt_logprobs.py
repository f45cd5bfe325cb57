"""Prompt-token logprobs (computed by the engine during prefill) in the two wire shapes clients read:
vLLM's `prompt_logprobs` and the legacy completions `logprobs` of an echoed prompt."""

from __future__ import annotations

import codecs

from app.schemas.common import PromptLogprob, PromptLogprobs
from app.schemas.completions import CompletionLogprobs
from scheduler.request import TokenLogprob


def vllm_prompt_logprobs(entries: list[TokenLogprob], top: int) -> PromptLogprobs:
    """One dict per prompt token, token id -> {logprob, rank, decoded_token}: the prompt's own
    token first, then the `top` most likely (the engine may have computed more for another field).
    The first token's entry is null."""
    out: PromptLogprobs = []
    for entry in entries:
        if entry.logprob is None:
            out.append(None)
            continue
        item = {entry.token_id: PromptLogprob(entry.logprob, entry.rank, entry.token)}
        names = entry.top_tokens or []
        for rank, ((token_id, logprob), name) in enumerate(zip(entry.top[:top], names, strict=False), 1):
            item.setdefault(token_id, PromptLogprob(logprob, rank, name))
        out.append(item)
    return out


class TextOffsets:
    """`text_offset`s: where each token starts in the text a choice returns, fed token by token
    (and, streamed, text by text).

    A token's bytes are decoded as a run, so a token that holds part of a character adds no text of
    its own: it starts at that character, as does the token that completes it, and the next token
    starts after it. A token whose text is not where the text goes on (a special token the text
    skips, a SentencePiece prefix space, text a stop string cut, or text a stream has not sent yet)
    is looked for a little further on, and otherwise starts where the text is. Offsets therefore
    never decrease and never pass the end of the text.
    """

    # How far past where the text goes on a token's text is looked for (a SentencePiece prefix
    # space, a character a cleanup rewrote). Small: a stream holds a token's offset back until
    # this much text follows its place, and a special token the text skips never shows (with 1,024
    # every logprob after one came with the stream's end).
    _WINDOW = 32

    def __init__(self, text: str = "", base: int = 0) -> None:
        self._text = text  # the choice's text from `base` on; what lies before `_pos` is dropped
        self._base = base
        self._pos = base
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def extend(self, text: str) -> None:
        self._text += text

    def place(self, entry: TokenLogprob) -> int:
        """Where `entry` starts, the text being complete (or as complete as it will get)."""
        offset = self._place(entry, final=True)
        assert offset is not None
        return offset

    def place_settled(
        self, pending: list[TokenLogprob], *, final: bool
    ) -> tuple[list[TokenLogprob], list[int]]:
        """The leading entries of `pending` whose place the text extended so far settles (all of
        them when `final`), removed from it, and their offsets. A stream
        sends a token's logprob once its place cannot change: with the text that shows it, or
        once enough text has come to show it is not there. Placed earlier (the text a detokenizer
        holds back for a split character or a possible stop string not yet sent), a token took the
        current position and streamed offsets differed from the whole answer's."""
        settled: list[TokenLogprob] = []
        offsets: list[int] = []
        while len(settled) < len(pending):
            offset = self._place(pending[len(settled)], final=final)
            if offset is None:
                break
            settled.append(pending[len(settled)])
            offsets.append(offset)
        del pending[: len(settled)]
        return settled, offsets

    def _place(self, entry: TokenLogprob, *, final: bool) -> int | None:
        raw = entry.token_bytes if entry.token_bytes is not None else entry.token.encode("utf-8")
        state = self._decoder.getstate()
        held = len(state[0])  # bytes of an unfinished character, from the tokens before
        chars = self._decoder.decode(raw)
        start = self._pos - self._base
        if not chars:
            return self._pos
        text = self._text
        candidates = tuple(dict.fromkeys((chars, chars.lstrip())))
        for candidate in candidates:
            if candidate and text.startswith(candidate, start):
                # Held bytes this token shows cannot finish a character are one U+FFFD, theirs:
                # the token starts after it.
                shift = 1 if held and candidate.startswith("\ufffd") else 0
                return self._advance(start + shift, start + len(candidate))
            if not final and candidate and candidate.startswith(text[start:]):
                self._decoder.setstate(state)  # the rest of it may still come
                return None
        # A byte-fallback decoder writes a whole run of byte tokens (one byte each) as U+FFFD, one
        # a byte, once one byte in it is invalid, valid ones included (0xB6 then "e" is two): such
        # a token takes its bytes' share of the run rather than the next look-alike further on.
        # Other tokens (a special token the text skips) take none of it.
        replaced = len(text) - start - len(text[start:].lstrip("\ufffd"))
        if replaced and len(raw) == 1:
            taken = held + 1
            if taken > replaced and not final and start + replaced == len(text):
                self._decoder.setstate(state)  # the rest of the run may still come
                return None
            taken = min(replaced, taken)
            return self._advance(start + min(held, taken - 1), start + taken)
        # Looked for further on only with more than spaces: a SentencePiece "▁" that the text does
        # not show would otherwise take the next space's place.
        for candidate in candidates:
            if candidate.strip():
                limit = start + len(candidate) + self._WINDOW
                found = text.find(candidate, start, limit)
                if found >= 0:
                    return self._advance(found, found + len(candidate))
                if not final and len(text) < limit:
                    self._decoder.setstate(state)
                    return None
        return self._pos

    def _advance(self, begin: int, end: int) -> int:
        offset = self._base + begin
        if end > 4 * self._WINDOW:  # a long stream keeps only the text not yet placed
            self._text = self._text[end:]
            self._base += end
            end = 0
        self._pos = self._base + end
        return offset


def echo_logprobs(entries: list[TokenLogprob], top: int, text: str) -> CompletionLogprobs:
    """The prompt's part of an echoed completion's `logprobs`: its first token has neither
    logprob nor alternatives (null, as OpenAI and vLLM write it); offsets index `text`, the echoed
    prompt."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    offsets = TextOffsets(text)
    for entry in entries:
        tokens.append(entry.token)
        token_logprobs.append(entry.logprob)
        alternatives = None
        if entry.logprob is not None:
            names = entry.top_tokens or []
            alternatives = {name: lp for (_, lp), name in zip(entry.top[:top], names, strict=False)}
            alternatives.setdefault(entry.token, entry.logprob)  # the prompt's token always included
        top_logprobs.append(alternatives)
        text_offset.append(offsets.place(entry))
    return CompletionLogprobs(tokens, token_logprobs, top_logprobs, text_offset)


def joined(first: CompletionLogprobs, then: CompletionLogprobs) -> CompletionLogprobs:
    """The echoed prompt's logprobs followed by the completion's."""
    return CompletionLogprobs(
        first.tokens + then.tokens,
        first.token_logprobs + then.token_logprobs,
        first.top_logprobs + then.top_logprobs,
        first.text_offset + then.text_offset,
    )
