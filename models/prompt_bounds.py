"""How much of a very long prompt to tokenize.

Prompts longer than MAX_INPUT_TOKENS are cut from the left. Tokenizing all of a huge text to keep
its last tokens costs minutes and gigabytes (a 60 MiB prompt did), so only an end of it that holds
more tokens than the limit for sure is tokenized: `max_token_chars` bounds how many characters a
token can stand for, and `dense_cut` finds an end with enough characters that are not whitespace,
for tokenizers whose normaliser drops whitespace (BERT's, SentencePiece's runs of spaces).
"""

from __future__ import annotations

import re


def max_token_chars(tokenizer) -> int:
    """The longest spelling in the vocabulary: no token stands for more characters than this
    (byte-level vocabularies spell each byte as one character, so it is an upper bound)."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # remote-code tokenizers without get_vocab: assume generous tokens
        return 64
    return max((len(piece) for piece in vocab), default=1) or 1


_WHITESPACE = re.compile(r"\s+")


def dense_cut(text: str, chars: int) -> int:
    """Where the last `chars` characters of `text` that are not whitespace begin (0 when it has
    fewer). Counted a chunk at a time from the end, in C, then within the chunk that holds the cut."""
    end, seen, step = len(text), 0, 1 << 16
    while end > 0:
        start = max(0, end - step)
        dense = len(_WHITESPACE.sub("", text[start:end]))
        if seen + dense >= chars:
            counted = seen
            for i in range(end - 1, start - 1, -1):
                if not text[i].isspace():
                    counted += 1
                    if counted >= chars:
                        return i
        seen += dense
        end = start
    return 0
