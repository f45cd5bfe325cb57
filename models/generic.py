"""The generic path: any model `generate()` can run, one sequence at a time.

Used when the fast path's self-test fails (custom remote code, M-RoPE models that keep
per-sequence state on the module, attention variants the slot cache does not reproduce).
`generate()` owns the model-specific input handling; our hooks make it use the same sampler,
stop rules and detokenizer as the fast path, stream each token out, and stop on cancellation.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria

from models.sampling import sample
from models.sequence import Sequence

log = logging.getLogger(__name__)


class _SampleWithOurRules(LogitsProcessor):
    """Picks the token with our sampler, then hands generate() scores where only it is finite,
    so generate's greedy step takes exactly that token."""

    def __init__(self, seq: Sequence, on_token: Callable[[], None]) -> None:
        self.seq = seq
        self.on_token = on_token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        tokens, logprobs = sample(scores[:1], [self.seq.sampler])
        forced = torch.full_like(scores, float("-inf"))
        if tokens[0] is None:
            self.seq.abort("error", "the model produced invalid (non-finite) scores for this request")
            forced[:, 0] = 0.0
        else:
            self.seq.append(tokens[0], logprobs[0])
            forced[:, tokens[0]] = 0.0
        self.on_token()
        return forced


class _StopWhenDone(StoppingCriteria):
    def __init__(self, seq: Sequence, cancelled: Callable[[], bool]) -> None:
        self.seq = seq
        self.cancelled = cancelled

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = self.seq.is_finished or self.cancelled()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class GenericRunner:
    kind = "generic"
    num_slots = 1

    def __init__(self, model, *, device: torch.device, pad_token_id: int | None) -> None:
        self.model = model
        self.device = device
        self.pad_token_id = pad_token_id
        # generate() fills unset fields from the checkpoint's generation_config (repetition
        # penalty, suppressed tokens, ...). Sampling defaults are the server's, so neutralise it.
        model.generation_config = GenerationConfig(pad_token_id=pad_token_id)

    @torch.inference_mode()
    def run(self, seq: Sequence, *, on_token: Callable[[], None], cancelled: Callable[[], bool]) -> None:
        inputs = {
            "input_ids": torch.tensor([seq.prompt_ids], dtype=torch.long, device=self.device),
            "attention_mask": torch.ones(1, len(seq.prompt_ids), dtype=torch.long, device=self.device),
        }
        inputs.update(seq.mm_inputs or {})
        # A clean config: no processors from the checkpoint's generation_config, so the scores our
        # sampler sees are the model's own, exactly as on the fast path. EOS is ours to decide.
        config = GenerationConfig(
            max_new_tokens=seq.max_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=self.pad_token_id,
            num_beams=1,
        )
        self.model.generate(
            **inputs,
            generation_config=config,
            logits_processor=[_SampleWithOurRules(seq, on_token)],
            stopping_criteria=[_StopWhenDone(seq, cancelled)],
        )
        seq.num_cached = seq.total_len
        if not seq.is_finished:
            seq.abort("abort" if cancelled() else "length")
