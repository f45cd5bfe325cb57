"""How much of a prompt each replica already holds in its prefix cache, for the router.

With several replicas, ranking by load alone spreads a conversation's turns over them, and each
turn's history is computed again wherever it lands: the hit rate falls to about one in the number
of replicas. The router takes a replica's cached prefix of the prompt off that replica's load, up
to the request's own work (`routing_credit`), and the request's cost there leaves it out (the
executor does not count it as done either): a turn goes back to the replica holding its history
unless that one has more work queued than the turn brings, or has no free rows where another has
(`router.pick_replica`).

The keys are the block manager's own (`blocks.block_key`) without a salt: a sequence past a
LongRoPE threshold is keyed with one, and its prefix is then not found here (it ranks as a miss).
Blocks another request is computing right now count for nothing yet: a burst of requests sharing a
new prefix goes by load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from models.prompt import PreparedPrompt
from scheduler.blocks import BlockKey, BlockManager, block_key
from scheduler.job import prompt_span


def cached_prompt_tokens(prepared: PreparedPrompt, executors: Sequence[Any]) -> dict[Any, int]:
    """Executor -> prompt tokens of `prepared` its prefix cache holds now (those holding none are
    left out); empty with fewer than two replicas to choose between. Walks the prompt's blocks
    only as far as some replica still holds them."""
    managers: list[tuple[Any, BlockManager]] = []
    for executor in executors:
        manager = executor.block_manager
        if manager is not None and manager.enable_prefix_caching:
            managers.append((executor, manager))
    if len(managers) < 2:
        return {}
    ids = prepared.token_ids
    span = prompt_span(prepared)
    held: dict[Any, int] = {}
    for size in {manager.block_size for _, manager in managers}:
        matching = [(e, m) for e, m in managers if m.block_size == size]
        previous: BlockKey | None = None
        # The last prompt token is always computed (its logits give the first new token).
        for index in range((len(ids) - 1) // size):
            tokens = tuple(ids[index * size : (index + 1) * size])
            digest = span.digest if span is not None and (index + 1) * size > span.first else None
            key = block_key(previous, None, tokens, digest)
            matching = [(e, m) for e, m in matching if m.holds(key)]
            if not matching:
                break
            for executor, _ in matching:
                held[executor] = (index + 1) * size
            previous = key
    if span is not None:
        # As the block manager's lookup: a hit may not end inside the span (computed in one chunk).
        sizes = {executor: manager.block_size for executor, manager in managers}
        for executor, tokens in held.items():
            if span.first < tokens <= span.last:
                held[executor] = span.first // sizes[executor] * sizes[executor]
    return {executor: tokens for executor, tokens in held.items() if tokens}


def routing_credit(held: dict[Any, int], prompt_tokens: int, new_tokens: int) -> dict[Any, int]:
    """What each replica's cached prefix takes off its load when the router ranks them: at most
    the request's own work there (its uncached prompt tokens and the tokens it may generate).
    Counted whole, a long prefix cached on one replica outweighed any load: a shared 1,559-token
    system prompt with 8-token answers sent 24 clients' traffic to that replica for as long as
    they ran, the others idle and never computing the prefix themselves. Capped, a prefix tips
    a near-tie (a conversation goes back to its history) but never holds a request behind more
    queued work than it brings."""
    return {executor: min(tokens, prompt_tokens - tokens + new_tokens) for executor, tokens in held.items()}
