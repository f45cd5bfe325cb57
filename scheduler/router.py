"""Pick the replica with the least outstanding work."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Routable(Protocol):
    name: str
    outstanding_tokens: int

    @property
    def is_ready(self) -> bool: ...

    @property
    def queue_depth(self) -> int: ...

    def has_room(self, sequences: int = 1) -> bool: ...


def pick_replica(replicas: Sequence[Routable], sequences: int = 1) -> Routable | None:
    """The ready replica with room in its queue for `sequences` more and the fewest outstanding tokens (queued plus
    running: prompt tokens still to prefill plus tokens still to generate), ties broken by queue
    depth. None when no replica can take the request."""
    candidates = [r for r in replicas if r.is_ready and r.has_room(sequences)]
    if not candidates:
        return None
    return min(candidates, key=lambda r: (r.outstanding_tokens, r.queue_depth))
