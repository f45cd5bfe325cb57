"""Incremental, UTF-8-safe detokenization and stop-string handling for one sequence."""

from __future__ import annotations

import codecs
import json
import logging
import re
import threading
import weakref
from collections.abc import Sequence

log = logging.getLogger(__name__)

# Prompt tokens fed to the decoder as context, so that the first generated token decodes with the
# spacing it has in context (SentencePiece "▁" prefixes, byte-level merges).
_CONTEXT_TOKENS = 6


def _whole_characters(tokenizer, ids: list[int], skip_special_tokens: bool) -> list[int]:
    """The last `_CONTEXT_TOKENS` or so of `ids`, starting and ending on whole characters.

    A window that starts inside a character (two emoji are eight byte-fallback tokens) decodes as
    U+FFFD: a byte-fallback decoder turns its whole run of bytes into U+FFFD, and the first
    generated token then decoded as the start of a text, its leading space dropped. The start
    moves back (or on) by up to three tokens, the most a UTF-8 character continues for.
    A token-id prompt may also end inside a character: its context decodes to a trailing U+FFFD,
    and once generated tokens complete the character, DecodeStream's text no longer extends it
    and it answers with the whole context, prompt included: its end is dropped instead."""

    def decode(window: list[int]) -> str:
        return tokenizer.decode(window, skip_special_tokens=skip_special_tokens)

    first = max(0, len(ids) - _CONTEXT_TOKENS)
    if decode(ids[first:]).startswith("\ufffd"):
        candidates = [*range(first - 1, max(-1, first - 4), -1), *range(first + 1, min(len(ids), first + 4))]
        first = next((start for start in candidates if not decode(ids[start:]).startswith("\ufffd")), first)
    context = ids[first:]
    while context and decode(context).endswith("\ufffd"):
        context.pop()
    return context


class IncrementalDetokenizer:
    """Turns one token at a time into text, never splitting a multi-byte character.

    Uses the `tokenizers` DecodeStream for fast tokenizers; falls back to the prefix/read offset
    method (as in TGI and vLLM) for Python tokenizers, and for a sequence DecodeStream refuses.
    """

    def __init__(
        self,
        tokenizer,
        prompt_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        keep_special_tokens: Sequence[str] = (),
    ) -> None:
        self._tokenizer = tokenizer
        # Special tokens to keep while the others are skipped (a tool-call format's markers, which
        # some vocabularies mark special): the decoder keeps every special token, and the others
        # are dropped by id before they reach it, as skipping would.
        self._dropped: frozenset[int] = frozenset()
        if skip_special_tokens and keep_special_tokens:
            self._dropped = special_ids_except(tokenizer, tuple(keep_special_tokens))
            skip_special_tokens = False
        self._skip_special = skip_special_tokens
        dropped = self._dropped
        kept = [token_id for token_id in prompt_ids if token_id not in dropped]
        context = _whole_characters(tokenizer, kept, skip_special_tokens)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = None
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self._backend = backend
            self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        # Tokens whose text has been returned (DecodeStream holds back an unfinished character).
        self._sent = len(context)
        self._token_bytes: TokenBytes | None = None
        # After DecodeStream gave up: the tokens' own bytes through one UTF-8 decoder, where the
        # vocabulary's pieces spell bytes (byte-level or byte-fallback), as vLLM's restarted stream
        # does: an invalid byte is one U+FFFD, and text already sent is never written again.
        self._utf8: codecs.IncrementalDecoder | None = None

    def push(self, token_id: int) -> str:
        if token_id in self._dropped:
            return ""
        self._ids.append(token_id)
        if self._stream is not None:
            try:
                text = self._stream.step(self._backend, token_id)
            except Exception:
                # DecodeStream refuses some byte-fallback sequences ("Invalid prefix encountered":
                # byte tokens that are not valid UTF-8 make the decoder redo the whole run of bytes
                # as U+FFFD, the text it already sent included). The rest of this sequence goes
                # from the last token whose text was sent, so that bytes DecodeStream held back
                # come out too (as U+FFFD if invalid).
                self._stream = None
                if self._names().style in ("byte_level", "metaspace"):
                    return self._bytes_from_the_unsent()
                # Pieces that do not spell bytes: the offsets method, decoded text compared before
                # and after.
                self._read_offset = self._sent
                self._prefix_offset = max(0, self._read_offset - _CONTEXT_TOKENS)
            else:
                if text:
                    self._sent = len(self._ids)
                return text or ""
        if self._utf8 is not None:
            return self._utf8.decode(self._raw_bytes(token_id))
        decode = self._tokenizer.decode
        prefix = decode(
            self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=self._skip_special
        )
        full = decode(self._ids[self._prefix_offset :], skip_special_tokens=self._skip_special)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            self._sent = len(self._ids)
            return full[len(prefix) :]
        return ""

    def _bytes_from_the_unsent(self) -> str:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        unsent, self._sent = self._ids[self._sent :], len(self._ids)
        return "".join(self._utf8.decode(self._raw_bytes(token_id)) for token_id in unsent)

    def _raw_bytes(self, token_id: int) -> bytes:
        if self._skip_special and token_id in special_ids_except(self._tokenizer, ()):
            return b""
        text = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return self._names().of(self._tokenizer, token_id, text)

    def _names(self) -> TokenBytes:
        if self._token_bytes is None:
            self._token_bytes = token_bytes_for(self._tokenizer)
        return self._token_bytes

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each token decoded on its own (for logprobs), special tokens included."""
        return [self._tokenizer.decode([token_id], skip_special_tokens=False) for token_id in ids]

    def token_texts_and_bytes(self, ids: Sequence[int]) -> tuple[list[str], list[bytes]]:
        """Each token decoded on its own, and its own UTF-8 bytes (for logprobs' `bytes`): a token
        that holds part of a character decodes to U+FFFD, but its bytes are the real ones, so that
        the bytes of consecutive tokens join into the text's UTF-8."""
        texts = self.token_texts(ids)
        names, tokenizer = self._names(), self._tokenizer
        raw = [names.of(tokenizer, token_id, text) for token_id, text in zip(ids, texts, strict=True)]
        if names.style == "metaspace":
            # A SentencePiece token decoded alone loses the space its "▁" stands for, which the
            # answer's text keeps: the token's text is its bytes, as for byte-level vocabularies.
            texts = [piece.decode("utf-8", errors="replace") for piece in raw]
        return texts, raw

    def flush(self) -> str:
        """Text still owed at the end: bytes held back for a character that never completed (as
        U+FFFD, as `decode` writes them). Taken from the tokens after the last one whose text was
        sent, decoded after a few before it: comparing with the whole output decoded afresh fails
        where a byte-fallback decoder rewrites a whole run of bytes, or drops a first "▁" space."""
        if self._utf8 is not None:
            return self._utf8.decode(b"", final=True)
        ids, sent = self._ids, self._sent
        if sent >= len(ids):
            return ""
        decode, skip = self._tokenizer.decode, self._skip_special
        start = max(0, sent - _CONTEXT_TOKENS)
        before = decode(ids[start:sent], skip_special_tokens=skip)
        full = decode(ids[start:], skip_special_tokens=skip)
        self._sent = len(ids)
        if full.startswith(before):
            return full[len(before) :]
        return decode(ids[sent:], skip_special_tokens=skip)


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


# Byte-fallback pieces (SentencePiece, Llama): one raw byte each.
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_METASPACE = "\u2581"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {char: byte for byte, char in _bytes_to_unicode().items()}


class TokenBytes:
    """The raw bytes of single tokens of one tokenizer, cached per token id (the tokenizer is
    passed in, not kept: this is the value of a cache keyed weakly by the tokenizer).

    A token decoded alone is its bytes unless it holds part of a character (it then decodes to
    U+FFFD) or is a SentencePiece piece (decoding alone drops the space its "▁" stands for); those
    are read from the token's vocabulary piece. Never raises: logprobs are built on the replica
    thread, where an exception would take the replica down.
    """

    def __init__(self, tokenizer) -> None:
        self._style = _decoder_style(tokenizer)
        self._cache: dict[int, bytes] = {}

    @property
    def style(self) -> str:
        return self._style

    def of(self, tokenizer, token_id: int, text: str) -> bytes:
        if "\ufffd" not in text and self._style != "metaspace":
            return text.encode("utf-8", errors="replace")
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._from_piece(tokenizer, token_id, text)
        return cached

    def _from_piece(self, tokenizer, token_id: int, text: str) -> bytes:
        fallback = text.encode("utf-8", errors="replace")
        try:
            piece = tokenizer.convert_ids_to_tokens(token_id)
            if not isinstance(piece, str) or not piece:
                return fallback
            if match := _BYTE_PIECE.fullmatch(piece):
                return bytes([int(match.group(1), 16)])
            if self._style == "byte_level":
                raw = [_UNICODE_TO_BYTE.get(char) for char in piece]
                # An added token is stored as its text, not in the byte alphabet.
                return bytes(raw) if None not in raw else fallback  # type: ignore[arg-type]
            if self._style == "metaspace":
                return piece.replace(_METASPACE, " ").encode("utf-8")
        except Exception:
            log.debug("no vocabulary piece for token %d", token_id, exc_info=True)
        return fallback


def _decoder_style(tokenizer) -> str:
    """Which vocabulary a tokenizer's pieces are written in: "byte_level" (GPT-2-style, tiktoken
    conversions), "metaspace" (SentencePiece) or "" (a token's decoded text taken as its bytes)."""
    try:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None) if backend is not None else None
        if decoder is not None:
            spec = json.dumps(json.loads(decoder.__getstate__()), ensure_ascii=False)
            if '"ByteLevel"' in spec:
                return "byte_level"
            if '"Metaspace"' in spec or _METASPACE in spec:
                return "metaspace"
            return ""
        if getattr(tokenizer, "sp_model", None) is not None:
            return "metaspace"
    except Exception:
        log.debug("tokenizer decoder not recognised", exc_info=True)
    return ""


_SPECIAL_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TOKEN_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def special_ids_except(tokenizer, keep: tuple[str, ...]) -> frozenset[int]:
    """The ids `decode(skip_special_tokens=True)` leaves out, except those of the tokens `keep`."""
    with _CACHES_LOCK:
        try:
            cache = _SPECIAL_IDS.setdefault(tokenizer, {})
        except TypeError:  # not weakly referenceable: computed each time
            cache = {}
        found = cache.get(keep)
        if found is None:
            added = getattr(tokenizer, "added_tokens_decoder", None) or {}
            special = {i for i, token in added.items() if getattr(token, "special", False)}
            special.update(getattr(tokenizer, "all_special_ids", ()) or ())
            kept = {i for i in special if tokenizer.convert_ids_to_tokens(i) in keep}
            found = cache[keep] = frozenset(special - kept)
        return found


def token_bytes_for(tokenizer) -> TokenBytes:
    """One cache per tokenizer, shared by the detokenizers of all its sequences."""
    with _CACHES_LOCK:
        try:
            names = _TOKEN_BYTES.get(tokenizer)
            if names is None:
                names = _TOKEN_BYTES[tokenizer] = TokenBytes(tokenizer)
            return names
        except TypeError:  # not weakly referenceable: a cache of its own
            return TokenBytes(tokenizer)
