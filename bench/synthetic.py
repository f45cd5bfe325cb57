"""Deterministic request content: prompts of a chosen token length, and images as data URLs."""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path

# Common short English words: one token each in most BPE vocabularies, so word count ~ token count.
_WORDS = (
    "the of and to in is was for on that with as by at from his her they this which "
    "be or an had not are but were one all their there been has when who will more no if out "
    "so said what up its about into than them can only other new some could time these two may "
    "then do first any my now such like our over man me even most made after also did many"
).split()


def synthetic_prompt(index: int, num_tokens: int, tokenizer=None, salt: int = 0) -> str:
    """Deterministic text of ~num_tokens tokens; cut at num_tokens when a `tokenizers.Tokenizer` is
    given. Prompts of another `salt` share nothing with these past the first word."""
    # The index (and salt) lead so that no two prompts share a prefix: prefix caching must not
    # flatter anyone.
    words = [f"Request {salt}-{index}:" if salt else f"Request {index}:"]
    state = (salt * 1_000_003 + index) * 2654435761 + 12345
    for _ in range(max(num_tokens - 3, 1) * (4 if tokenizer else 1)):
        state = (state * 1103515245 + 12345) & 0x7FFFFFFF
        words.append(_WORDS[state % len(_WORDS)])
    text = " ".join(words)
    if tokenizer is None:
        return text
    return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids[:num_tokens])


def load_tokenizer(path: str):
    """A model folder or a tokenizer.json; needs the `tokenizers` package only when used."""
    from tokenizers import Tokenizer

    file = Path(path)
    return Tokenizer.from_file(str(file / "tokenizer.json" if file.is_dir() else file))


def synthetic_png(size: int = 64) -> bytes:
    """A deterministic RGB gradient as PNG bytes, written by hand so PIL is not required."""
    rows = b"".join(
        b"\x00" + bytes(c for x in range(size) for c in (x * 4 % 256, y * 4 % 256, (x + y) * 2 % 256))
        for y in range(size)
    )

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def image_data_url(image: str) -> str:
    if image == "synthetic":
        return "data:image/png;base64," + base64.b64encode(synthetic_png()).decode()
    path = Path(image)
    mime = {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp", ".gif": "gif"}.get(path.suffix.lower(), "png")
    return f"data:image/{mime};base64," + base64.b64encode(path.read_bytes()).decode()
