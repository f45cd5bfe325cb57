"""Server-Sent Events as a client reads them: the bytes a stream yields, cut at event boundaries
(how the server groups events into writes is not part of the protocol)."""

from __future__ import annotations


def sse_events(writes: list[bytes]) -> list[bytes]:
    return [event + b"\n\n" for event in b"".join(writes).split(b"\n\n") if event]
