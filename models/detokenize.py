"""Incremental, UTF-8-safe detokenization and stop-string handling for one sequence."""

from __future__ import annotations

from collections.abc import Sequence

# Prompt tokens fed to the decoder as context, so that the first generated token decodes with the
# spacing it has in context (SentencePiece "▁" prefixes, byte-level merges).
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Turns one token at a time into text, never splitting a multi-byte character.

    Uses the `tokenizers` DecodeStream for fast tokenizers; falls back to the prefix/read offset
    method (as in TGI and vLLM) for Python tokenizers, and for a sequence DecodeStream refuses.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int], *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = None
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self._backend = backend
            self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        if self._stream is not None:
            try:
                return self._stream.step(self._backend, token_id) or ""
            except Exception:
                # DecodeStream refuses some byte-fallback sequences ("Invalid prefix encountered":
                # byte tokens that are not valid UTF-8 change how the text before them decodes).
                # The rest of this sequence goes by offsets, from the tokens already emitted (text
                # DecodeStream was holding back for an unfinished character is not sent).
                self._stream = None
                self._read_offset = len(self._ids) - 1
                self._prefix_offset = max(0, self._read_offset - _CONTEXT_TOKENS)
        decode = self._tokenizer.decode
        prefix = decode(
            self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=self._skip_special
        )
        full = decode(self._ids[self._prefix_offset :], skip_special_tokens=self._skip_special)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return full[len(prefix) :]
        return ""

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each token decoded on its own (for logprobs), special tokens included."""
        return [self._tokenizer.decode([token_id], skip_special_tokens=False) for token_id in ids]

    def flush(self, output_ids: Sequence[int], emitted: str) -> str:
        """Text still owed at the end: bytes held back waiting for a character that never completed."""
        full = self._tokenizer.decode(list(output_ids), skip_special_tokens=self._skip_special)
        if len(full) > len(emitted) and full.startswith(emitted):
            return full[len(emitted) :]
        return ""


class StopStringMatcher:
    """Finds stop strings across chunk boundaries and holds back text that may start one, so a
    stop string is never emitted, not even partially."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was hit)."""
        if not self._stops:
            return text, False
        buffer = self._pending + text
        hits = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            return buffer[: min(hits)], True
        hold = self._held_suffix_length(buffer)
        self._pending = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold], False

    @property
    def pending(self) -> str:
        return self._pending

    def flush(self) -> str:
        pending, self._pending = self._pending, ""
        return pending

    def _held_suffix_length(self, buffer: str) -> int:
        for size in range(min(len(buffer), self._longest - 1), 0, -1):
            tail = buffer[-size:]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0
