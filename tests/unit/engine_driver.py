"""Drive a replica through the real Executor, one step at a time in the test's thread, and ask
transformers for the reference."""

from __future__ import annotations

from collections import defaultdict

import torch

from models.params import PromptInput, SamplingParams
from models.prompt import PreparedPrompt
from scheduler.executor import Executor
from scheduler.job import Job
from scheduler.request import EngineRequest, RequestStream
from tests.unit.configs import executor_config


class EngineDriver:
    """The executor's own step loop (collect, schedule, run, advance, emit) without its thread:
    requests join exactly at the step a test chooses."""

    def __init__(self, replica, *, max_batch_size: int = 8, max_prefill_tokens: int = 10_000) -> None:
        self.replica = replica
        self.tokens: dict[tuple[str, int], list[int]] = defaultdict(list)
        self.text: dict[tuple[str, int], str] = defaultdict(str)
        self.finished: dict[tuple[str, int], tuple[str, str | None]] = {}
        self.prompt_logprobs: dict[str, list] = defaultdict(list)  # request id -> entries
        config = executor_config(max_batch_size=max_batch_size, max_prefill_tokens=max_prefill_tokens)
        self.executor = Executor("test", str(replica.loaded.device), lambda: replica, self._deliver, config)
        self.executor.attach(replica)
        self._count = 0

    def _deliver(self, items) -> None:
        for stream, index, delta in items:
            key = (stream.request_id, index)
            self.prompt_logprobs[stream.request_id].extend(delta.prompt_logprobs)
            self.tokens[key].extend(delta.token_ids)
            self.text[key] += delta.text
            if delta.finish_reason is not None:
                self.finished[key] = (delta.finish_reason, delta.error)

    def submit(self, prepared: PreparedPrompt, params: SamplingParams, *, n: int = 1) -> RequestStream:
        self._count += 1
        request = EngineRequest(
            f"r{self._count}", PromptInput(token_ids=tuple(prepared.token_ids)), params, n=n
        )
        stream = RequestStream(request, prepared)
        self.executor.submit(Job(stream, prepared, cost=0))
        return stream

    def done(self, stream: RequestStream) -> bool:
        return all((stream.request_id, i) in self.finished for i in range(stream.request.n))

    def outputs(self, stream: RequestStream) -> list[list[int]]:
        return [self.tokens[(stream.request_id, i)] for i in range(stream.request.n)]

    def run(self, streams: list[RequestStream], *, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if all(self.done(s) for s in streams):
                return
            self.executor.step()
        raise AssertionError("requests did not finish")


def run_jobs(replica, jobs, *, prefill_budget: int = 10_000, max_batch_size: int = 8) -> list[list[int]]:
    """jobs: (join_step, prepared, params). Each job joins the batch at its step; prompts are
    prefilled in chunks of at most `prefill_budget` tokens per step. Returns each job's output ids."""
    driver = EngineDriver(replica, max_batch_size=max_batch_size, max_prefill_tokens=prefill_budget)
    order = sorted(range(len(jobs)), key=lambda i: jobs[i][0])
    streams: dict[int, RequestStream] = {}
    step = 0
    while len(streams) < len(jobs) or not all(driver.done(s) for s in streams.values()):
        for i in order:
            if i not in streams and jobs[i][0] <= step:
                streams[i] = driver.submit(jobs[i][1], jobs[i][2])
        driver.executor.step()
        step += 1
        if step > 10_000:
            raise AssertionError("requests did not finish")
    return [driver.outputs(streams[i])[0] for i in range(len(jobs))]


def hf_greedy(replica, prepared: PreparedPrompt, max_new_tokens: int) -> list[int]:
    """transformers' own generate() on the same inputs, with the model's own attention."""
    model = replica.loaded.model
    config = model.config.get_text_config(decoder=True)
    original = config._attn_implementation
    if replica.path == "fast":
        config._attn_implementation = replica.runner.original_attn
    try:
        inputs = {
            "input_ids": torch.tensor([prepared.token_ids]),
            "attention_mask": torch.ones(1, len(prepared.token_ids), dtype=torch.long),
        }
        inputs.update(prepared.mm_inputs or {})
        inputs = {name: value.to(model.device) for name, value in inputs.items()}  # no-op on CPU
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
            )
    finally:
        config._attn_implementation = original
    return out[0, len(prepared.token_ids) :].tolist()
