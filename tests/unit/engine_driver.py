"""Drive a replica's runner the way the executor does, and ask transformers for the reference."""

from __future__ import annotations

import torch

from models.prompt import PreparedPrompt


def run_jobs(replica, jobs, *, prefill_budget: int = 10_000) -> list[list[int]]:
    """jobs: (join_step, prepared, params). Each job joins the batch at its step; prompts are
    prefilled in chunks of at most `prefill_budget` tokens per step (an image prompt whole, as the
    executor does). Returns each job's output ids."""
    runner = replica.runner
    pending = sorted(enumerate(jobs), key=lambda item: item[1][0])
    seqs, running, step = {}, [], 0
    while pending or running:
        while pending and pending[0][1][0] <= step:
            index, (_, prepared, params) = pending.pop(0)
            seq = replica.new_sequences(prepared, params)[0]
            runner.admit(seq)
            seqs[index] = seq
            running.append(seq)
        decode = [s for s in running if not s.is_prefilling]
        budget, prefill = prefill_budget, []
        for s in running:
            if s.is_prefilling and budget > 0:
                take = s.remaining_prompt if s.mm_inputs and s.num_cached == 0 else min(s.remaining_prompt, budget)
                prefill.append((s, take))
                budget -= take
        if decode or prefill:
            runner.step(decode, prefill)
        for s in [s for s in running if s.is_finished]:
            runner.release(s)
            running.remove(s)
        step += 1
    return [seqs[i].output_ids for i in range(len(jobs))]


def hf_greedy(replica, prepared: PreparedPrompt, max_new_tokens: int) -> list[int]:
    """transformers' own generate() on the same inputs, with the model's own attention."""
    model = replica.loaded.model
    config = model.config.get_text_config(decoder=True)
    original = config._attn_implementation
    if replica.path == "fast":
        config._attn_implementation = replica.runner._original_attn
    try:
        inputs = {
            "input_ids": torch.tensor([prepared.token_ids]),
            "attention_mask": torch.ones(1, len(prepared.token_ids), dtype=torch.long),
        }
        inputs.update(prepared.mm_inputs or {})
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    finally:
        config._attn_implementation = original
    return out[0, len(prepared.token_ids) :].tolist()
