"""How much of a prompt each replica already holds in its prefix cache, for the router.

With several replicas, ranking by load alone spreads a conversation's turns over them, and each
turn's history is computed again wherever it lands: the hit rate falls to about one in the number
of replicas. The router takes a replica's cached prefix of the prompt off that replica's load, up
to the request's own work (`routing_credit`), and the request's cost there leaves it out (the
executor does not count it as done either): a turn goes back to the replica holding its history
unless that one has more work queued than the turn brings, or has no free rows where another has
(`router.pick_replica`).

The lookup is the block manager's own, on a sequence without a salt: a sequence past a LongRoPE
threshold is keyed with one, and its prefix is then not found here (it ranks as a miss). The
lookup reads the replica's table from the event loop while the replica thread changes it: each
dict lookup is atomic under the GIL, and a stale answer only ranks a replica differently.
Blocks another request is computing right now count for nothing yet: a burst of requests sharing a
new prefix goes by load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from models.prompt import PreparedPrompt
from scheduler.job import prompt_span
from scheduler.sequence import Sequence as Seq


def cached_prompt_tokens(prepared: PreparedPrompt, executors: Sequence[Any]) -> dict[Any, int]:
    """Executor -> prompt tokens of `prepared` its prefix cache holds now (those holding none are
    left out); empty with fewer than two replicas to choose between. Each replica's own lookup
    decides (the last prompt token always computed, a hit never ending inside an image span), on
    a throwaway sequence per block size that keys the prompt once for replicas of that size."""
    managers = [(e, e.block_manager) for e in executors]
    managers = [(e, m) for e, m in managers if m is not None and m.enable_prefix_caching]
    if len(managers) < 2:
        return {}
    probes: dict[int, Seq] = {}
    held: dict[Any, int] = {}
    for executor, manager in managers:
        probe = probes.get(manager.block_size)
        if probe is None:
            probe = probes[manager.block_size] = Seq(
                list(prepared.token_ids), max_tokens=1, arrival=0.0, span=prompt_span(prepared)
            )
        hits, _ = manager.lookup(probe)
        if hits:
            held[executor] = len(hits) * manager.block_size
    return held


def routing_credit(held: dict[Any, int], prompt_tokens: int, new_tokens: int) -> dict[Any, int]:
    """What each replica's cached prefix takes off its load when the router ranks them: at most
    the request's own work there (its uncached prompt tokens and the tokens it may generate).
    Counted whole, a long prefix cached on one replica outweighed any load: a shared 1,559-token
    system prompt with 8-token answers sent 24 clients' traffic to that replica for as long as
    they ran, the others idle and never computing the prefix themselves. Capped, a prefix tips
    a near-tie (a conversation goes back to its history) but never holds a request behind more
    queued work than it brings."""
    return {executor: min(tokens, prompt_tokens - tokens + new_tokens) for executor, tokens in held.items()}
