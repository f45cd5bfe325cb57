"""The generic path: models the paged fast path cannot reproduce, run by their own `generate()`.

Used when the fast path's self-test fails (remote code, bidirectional image attention, M-RoPE,
cross-attention). It executes the same step plans as `PagedRunner`, so one engine loop, one
scheduler and one set of admission, preemption and cancellation rules serve every model.

Each running sequence has a `generate()` call of its own in a helper thread, advanced one forward
pass per step: a logits processor hands the step's scores to the runner and waits for the token
our sampler picks, which it forces; a stopping criterion ends the call when the sequence leaves
the batch. Only one such thread computes at a time (the runner waits for each in turn), so
`generate()` keeps owning everything model-specific (caches, multimodal inputs, position state)
and its greedy output is the model's own by construction.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria

from models.plan import PlanRow, SampledToken, StepPlan
from models.sampling import draw

log = logging.getLogger(__name__)

_STOP = object()
_NO_LIMIT = 1 << 30  # generate() stops when the sequence leaves the batch, never by length
GENERATION_FAILED = "generation failed"
# Per-sequence state some models keep on their modules between forward passes (Qwen2-VL and kin
# cache the M-RoPE offset of the prompt they prefilled last): saved and restored per sequence.
_MODULE_STATE = ("rope_deltas",)
_JOIN_TIMEOUT_S = 60.0


class _Lockstep(LogitsProcessor):
    """One generate() call's logits hook: the step's scores out, the chosen token in (forced as
    the only finite score, so generate's own greedy pick takes it), stop when told."""

    def __init__(self) -> None:
        self.scores: queue.SimpleQueue = queue.SimpleQueue()  # [vocab] fp32 scores, or an exception
        self.tokens: queue.SimpleQueue = queue.SimpleQueue()  # token ids to force, or _STOP
        self.stopped = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        forced = torch.full_like(scores, float("-inf"))
        if self.stopped:  # a deferred stop check may run one more forward; its token is discarded
            forced[:, 0] = 0.0
            return forced
        self.scores.put(scores[0].float().clone())
        token = self.tokens.get()
        if token is _STOP:
            self.stopped = True
            token = 0
        forced[:, token] = 0.0
        return forced


class _StopHook(StoppingCriteria):
    def __init__(self, lockstep: _Lockstep) -> None:
        self.lockstep = lockstep

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full(
            (input_ids.shape[0],), self.lockstep.stopped, dtype=torch.bool, device=input_ids.device
        )


class _SequenceThread:
    """One sequence's generate() call in its own thread, one forward pass per `advance()`."""

    def __init__(self, runner: GenericRunner, token_ids: list[int], mm_inputs: dict | None) -> None:
        self.token_ids = list(token_ids)
        self.mm_inputs = mm_inputs
        self.module_state: list = [None] * len(runner.stateful)
        self._hooks = _Lockstep()
        self._thread = threading.Thread(
            target=self._run, args=(runner,), name="generic-sequence", daemon=True
        )
        self._thread.start()

    def _run(self, runner: GenericRunner) -> None:
        device = runner.device
        inputs = {
            "input_ids": torch.tensor([self.token_ids], dtype=torch.long, device=device),
            "attention_mask": torch.ones(1, len(self.token_ids), dtype=torch.long, device=device),
        }
        inputs.update(self.mm_inputs or {})
        config = GenerationConfig(
            max_new_tokens=_NO_LIMIT,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=runner.pad_token_id,
            num_beams=1,
        )
        try:
            with runner.scope(), torch.inference_mode():
                runner.model.generate(
                    **inputs,
                    generation_config=config,
                    logits_processor=[self._hooks],
                    stopping_criteria=[_StopHook(self._hooks)],
                )
        except Exception as exc:  # the sequence fails alone
            log.warning(
                "generate() failed for one sequence: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG)
            )
            self._hooks.scores.put(exc)
            return
        if not self._hooks.stopped:
            self._hooks.scores.put(RuntimeError("generate() ended by itself"))

    def next_scores(self, token: int | None) -> torch.Tensor:
        """Feed the token sampled last step (None for the first forward) and wait for the scores
        of the next position. Raises what generate() raised."""
        if token is not None:
            self.token_ids.append(token)
            self._hooks.tokens.put(token)
        result = self._hooks.scores.get()
        if isinstance(result, BaseException):
            raise result
        return result

    def stop(self) -> None:
        """End the call and wait for its thread, so no forward pass of it overlaps the next one."""
        self._hooks.tokens.put(_STOP)
        self._thread.join(_JOIN_TIMEOUT_S)


class GenericRunner:
    kind = "generic"
    chunked_prefill = False  # generate() computes a prompt in one forward
    prefix_caching = False  # generate() keeps its own cache; nothing is shared
    long_rope_after = None  # generate() switches LongRoPE factors itself

    def __init__(
        self,
        model,
        *,
        device: torch.device,
        pad_token_id: int | None,
        scope: Callable[[], AbstractContextManager],
    ) -> None:
        self.model = model
        self.device = device
        self.pad_token_id = pad_token_id
        self.scope = scope
        self.backend = "the model's own attention via generate()"
        self.stateful = [(m, name) for m in model.modules() for name in _MODULE_STATE if hasattr(m, name)]
        self._threads: dict[int, _SequenceThread] = {}
        # Forked choices of an n > 1 request: the parent's context, until their first decode row.
        self._forked: dict[int, tuple[list[int], dict | None]] = {}
        # generate() fills unset fields from the checkpoint's generation_config (repetition
        # penalty, suppressed tokens, ...). Sampling is the server's, so neutralise it.
        model.generation_config = GenerationConfig(pad_token_id=pad_token_id)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> list[SampledToken]:
        self.release(plan.released)
        scores: list[torch.Tensor] = []
        sampling_rows: list[PlanRow] = []
        failed: dict[int, str] = {}
        for index, row in enumerate(plan.rows):
            try:
                scores.append(self._advance(row))
                sampling_rows.append(row)
            except Exception as exc:
                self.release([row.seq_id])
                failed[index] = f"{GENERATION_FAILED}: {type(exc).__name__}"
        for parent, child in plan.forks:
            thread = self._threads.get(parent)
            if thread is not None:
                self._forked[child] = (list(thread.token_ids), thread.mm_inputs)
        drawn = iter(draw(torch.stack(scores), sampling_rows) if scores else [])
        results = []
        for index, row in enumerate(plan.rows):
            for _ in row.samplers:
                results.append(SampledToken(None, None, failed[index]) if index in failed else next(drawn))
        return results

    def _advance(self, row: PlanRow) -> torch.Tensor:
        thread = self._threads.get(row.seq_id)
        token: int | None = None
        if row.start == 0 or thread is None:
            if thread is not None:
                self.release([row.seq_id])
            # The whole prompt's inputs, images or not (PaliGemma's token types, for one).
            tokens, mm_inputs = row.token_ids, row.inputs.mm_inputs if row.inputs is not None else None
            if row.start:  # a forked choice: its first decode row recomputes the shared prompt
                context, mm_inputs = self._forked.pop(row.seq_id)
                tokens = context + row.token_ids
            self._restore(None)
            thread = self._threads[row.seq_id] = _SequenceThread(self, tokens, mm_inputs)
        else:
            if len(row.token_ids) != 1:
                raise RuntimeError("the generic path continues a sequence one token at a time")
            self._restore(thread.module_state)
            token = row.token_ids[0]
        scores = thread.next_scores(token)
        thread.module_state = [getattr(module, name) for module, name in self.stateful]
        return scores

    def _restore(self, state: list | None) -> None:
        for index, (module, name) in enumerate(self.stateful):
            setattr(module, name, None if state is None else state[index])

    def release(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            thread = self._threads.pop(seq_id, None)
            if thread is not None:
                thread.stop()
            self._forked.pop(seq_id, None)
