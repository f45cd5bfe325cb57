"""Why a replica fails a request or itself: the messages clients and /health see, and how a row
that got no token is told apart (the request's grammar, the runner's reason, non-finite logits)."""

from __future__ import annotations

import logging

from models.errors import EngineError, GenerationError, InvalidRequestError
from models.plan import SampledToken
from scheduler.sequence import Sequence

log = logging.getLogger(__name__)

GENERIC_FAILURE = "generation failed"
NON_FINITE = "the model produced invalid (non-finite) scores for this request"
SHUTTING_DOWN = "the server is shutting down; retry on another replica"
CACHE_FULL = "the request does not fit this replica's KV cache memory"
STEP_LOOP_CRASHED = "the replica's step loop crashed"
REPLICA_STOPPED = (
    "the replica this request was queued on stopped after an internal error before starting it; retry"
)


def sampling_failure(seq: Sequence, sample: SampledToken) -> EngineError:
    """Why a row got no token: its grammar gave up (the request's fault: 400), the runner said
    why, or the logits were not finite."""
    constraint = seq.sampler.constraint
    if constraint is not None and constraint.error:
        return InvalidRequestError(
            f"constrained decoding stopped: the grammar exceeded the engine's limits ({constraint.error[:300]})",
            param=constraint.param,
        )
    if constraint is not None and seq.sampler.nothing_allowed:
        # The grammar's mask left no token (with the request's logit_bias and filters): its fault,
        # not the model's (these logits were finite).
        return InvalidRequestError(
            f"constrained decoding stopped: the grammar from {constraint.param} allows no token here "
            "(a grammar that spells out an end-of-text token, or one that cannot go on)",
            param=constraint.param,
        )
    if seq.sampler.nothing_allowed:
        return InvalidRequestError(
            "min_tokens bans the end and stop tokens, and stop_token_ids with the end tokens cover the "
            "whole vocabulary: no token is left to generate",
            param="stop_token_ids",
        )
    if sample.error is None:
        log.warning("sequence %d produced non-finite logits; failing it alone", seq.seq_id)
    return GenerationError(sample.error or NON_FINITE)
