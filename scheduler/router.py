"""Pick the replica that starts a request soonest: one with free rows, then the least outstanding work."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol


class Routable(Protocol):
    name: str

    @property
    def is_ready(self) -> bool: ...

    @property
    def remaining_tokens(self) -> int: ...

    @property
    def queue_depth(self) -> int: ...

    def has_room(self, sequences: int = 1) -> bool: ...

    def waits(self, sequences: int = 1) -> bool: ...


def pick_replica(
    replicas: Sequence[Routable], sequences: int = 1, cached: Mapping[Routable, int] | None = None
) -> Routable | None:
    """Among the ready replicas with room for `sequences` more: one whose free rows take them at
    its next step before one where they would wait (a full batch of long answers holds a short
    request back for as long as its rows stay taken, however little work it has left), then the
    fewest tokens of work left once the request is added (queued plus running: prompt tokens
    still to prefill plus tokens still to generate, a replica near the end of a long answer
    being nearly free; less the request's prompt tokens a replica holds in its prefix cache,
    `cached`, which it need not compute), then the shallowest queue. None when no replica can
    take the request."""
    candidates = [r for r in replicas if r.is_ready and r.has_room(sequences)]
    if not candidates:
        return None
    held = cached or {}
    return min(
        candidates,
        key=lambda r: (r.waits(sequences), r.remaining_tokens - held.get(r, 0), r.queue_depth),
    )
