"""The generic path: models the paged fast path cannot reproduce, run by their own `generate()`.

Used when the fast path's self-test fails (remote code, cross-attention, an attention that
bypasses transformers' AttentionInterface). It executes the same step plans as `PagedRunner`, so
one engine loop, one scheduler and one set of admission, preemption and cancellation rules serve
every model.

Each running sequence has a `generate()` call of its own in a helper thread, advanced one forward
pass per step: a logits processor hands the step's scores to the runner and waits for the token
our sampler picks, which it forces; a stopping criterion ends the call when the sequence leaves
the batch. `generate()` keeps owning everything model-specific (caches, multimodal inputs,
position state), so its greedy output is the model's own by construction.

The forward passes themselves are the runner's: every `generate()` thread's call to the model is
handed to the runner's thread, which computes the step's decode calls as one batch where it can
(`_Batcher`: each sequence's cache left-padded into one, the padding masked, as `generate()`
batches left-padded prompts) and everything else one call at a time.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria

from models.generic_batch import accepts_positions, groups, run_merged
from models.plan import PlanRow, SampledToken, StepPlan
from models.sampling import draw

log = logging.getLogger(__name__)

_STOP = object()
_NO_LIMIT = 1 << 30  # generate() stops when the sequence leaves the batch, never by length
GENERATION_FAILED = "generation failed"
# Per-sequence state some models keep on their modules between forward passes, saved and restored
# per sequence. Qwen2-VL and kin cache the M-RoPE offset of the prompt they prefilled last, which a
# forward given its positions does not read; RecurrentGemma keeps each layer's recurrent and
# convolution state there, which every decode forward reads and writes for its whole batch, so its
# decode calls are never merged.
_POSITION_STATE = ("rope_deltas",)
_RECURRENT_STATE = ("recurrent_states", "conv1d_state")
_MODULE_STATE = _POSITION_STATE + _RECURRENT_STATE
_JOIN_TIMEOUT_S = 60.0
_local = threading.local()


class _Stopped(Exception):
    """Raised in a generate() thread that asks for a forward after its sequence left the batch."""


class _Call:
    """A forward pass a generate() thread asked for; the runner computes it and sets `result`."""

    __slots__ = ("kwargs", "done", "result", "error")

    def __init__(self, kwargs: dict) -> None:
        self.kwargs = kwargs
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None


class _Lockstep(LogitsProcessor):
    """One generate() call's hooks: forward passes and the step's scores out, the chosen token in
    (forced as the only finite score, so generate's own greedy pick takes it), stop when told."""

    def __init__(self) -> None:
        # To the runner: a _Call, the [vocab] fp32 scores, or an exception.
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.tokens: queue.SimpleQueue = queue.SimpleQueue()  # token ids to force, or _STOP
        self.stopped = False
        self.pending: _Call | None = None  # the forward this thread waits for, if any

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        forced = torch.full_like(scores, float("-inf"))
        if self.stopped:  # a deferred stop check may run one more step; its token is discarded
            forced[:, 0] = 0.0
            return forced
        self.events.put(scores[0].float().clone())
        token = self.tokens.get()
        if token is _STOP:
            self.stopped = True
            token = 0
        forced[:, token] = 0.0
        return forced

    def forward(self, kwargs: dict):
        """In the generate() thread: hand the forward to the runner and wait for its result."""
        if self.stopped:
            raise _Stopped
        call = self.pending = _Call(kwargs)
        if self.stopped:  # stop() may have looked for a pending call just before it was set
            raise _Stopped
        self.events.put(call)
        call.done.wait()
        self.pending = None
        if call.error is not None:
            raise call.error
        return call.result


class _StopHook(StoppingCriteria):
    def __init__(self, lockstep: _Lockstep) -> None:
        self.lockstep = lockstep

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full(
            (input_ids.shape[0],), self.lockstep.stopped, dtype=torch.bool, device=input_ids.device
        )


class _SequenceThread:
    """One sequence's generate() call in its own thread, one forward pass per step."""

    def __init__(self, runner: GenericRunner, token_ids: list[int], mm_inputs: dict | None) -> None:
        self.token_ids = list(token_ids)
        self.mm_inputs = mm_inputs
        self.module_state: list = [None] * len(runner.stateful)
        self.hooks = _Lockstep()
        self._thread = threading.Thread(
            target=self._run, args=(runner,), name="generic-sequence", daemon=True
        )
        self._thread.start()

    def _run(self, runner: GenericRunner) -> None:
        _local.hooks = self.hooks
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
                    logits_processor=[self.hooks],
                    stopping_criteria=[_StopHook(self.hooks)],
                )
        except _Stopped:
            return
        except Exception as exc:  # the sequence fails alone
            if not self.hooks.stopped:
                log.warning(
                    "generate() failed for one sequence: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG)
                )
            self.hooks.events.put(exc)
            return
        if not self.hooks.stopped:
            self.hooks.events.put(RuntimeError("generate() ended by itself"))

    def feed(self, token: int) -> None:
        self.token_ids.append(token)
        self.hooks.tokens.put(token)

    def next_event(self):
        return self.hooks.events.get()

    def stop(self) -> None:
        """End the call and wait for its thread, so no forward pass of it overlaps the next one.
        A thread waiting for a forward the runner will not compute (its model's generate() asked
        for one where scores were due: Janus's drops the logits processor) is woken with
        _Stopped; it waited out the join's timeout, a minute of the step loop, and never ended."""
        hooks = self.hooks
        hooks.stopped = True
        hooks.tokens.put(_STOP)
        call = hooks.pending
        if call is not None and not call.done.is_set():
            call.error = _Stopped()
            call.done.set()
        self._thread.join(_JOIN_TIMEOUT_S)


def _token_types_to(mm_inputs: dict | None, length: int) -> dict | None:
    """A forked choice's prompt is its parent's plus the tokens sampled since: per-token type
    inputs grow to `length` as generate() grows them (token types repeat the last one,
    multimodal token types are text, 0). Left shorter, Qwen-VL's fail on the image mask."""
    if not mm_inputs:
        return mm_inputs
    grown = dict(mm_inputs)
    for name in ("token_type_ids", "mm_token_type_ids", "moe_mm_token_type_ids"):
        types = mm_inputs.get(name)
        if not isinstance(types, torch.Tensor) or types.dim() != 2 or types.shape[1] >= length:
            continue
        missing = length - types.shape[1]
        tail = (
            types[:, -1:].expand(-1, missing)
            if name == "token_type_ids"
            else types.new_zeros(types.shape[0], missing)
        )
        grown[name] = torch.cat([types, tail], dim=1)
    return grown


class GenericRunner:
    kind = "generic"
    chunked_prefill = False  # generate() computes a prompt in one forward
    prefix_caching = False  # generate() keeps its own cache; nothing is shared
    scores_prompts = False  # generate() hands out the last position's logits only
    long_rope_after = None  # generate() switches LongRoPE factors itself

    def __init__(
        self,
        model,
        *,
        device: torch.device,
        pad_token_id: int | None,
        scope: Callable[[], AbstractContextManager],
        batch_decode: bool = True,
    ) -> None:
        self.model = model
        self.device = device
        self.pad_token_id = pad_token_id
        self.scope = scope
        self.stateful = [(m, name) for m in model.modules() for name in _MODULE_STATE if hasattr(m, name)]
        self.recurrent_on_modules = any(name in _RECURRENT_STATE for _, name in self.stateful)
        self._threads: dict[int, _SequenceThread] = {}
        # Forked choices of an n > 1 request: the parent's context, until their first decode row.
        self._forked: dict[int, tuple[list[int], dict | None]] = {}
        # generate() fills unset fields from the checkpoint's generation_config (repetition
        # penalty, suppressed tokens, ...). Sampling is the server's, so neutralise it.
        # An encoder-decoder's decoder starts from its own token (Florence-2): kept, or every
        # generate() fails.
        starts = {
            name: value
            for name in ("decoder_start_token_id", "bos_token_id")
            if (value := getattr(model.generation_config, name, None)) is not None
        }
        model.generation_config = GenerationConfig(pad_token_id=pad_token_id, **starts)
        self.merged_calls = 0  # decode forwards computed as part of a merged batch
        self._forward = model.forward
        self._with_positions = accepts_positions(self._forward)
        self.batch_decode = batch_decode
        self.backend = "the model's own attention via generate()" + (
            ", decode steps batched" if self.batch_decode else ", one sequence per forward"
        )
        # generate() validates its keyword arguments against the forward's signature when the
        # model's prepare_inputs_for_generation takes only **kwargs (Bamba, FalconH1): the
        # interceptor shows the model's own, or every call is refused for its attention_mask.
        intercept = self._intercept

        @functools.wraps(self._forward)
        def forward(*args, **kwargs):
            return intercept(*args, **kwargs)

        model.forward = forward

    def _intercept(self, *args, **kwargs):
        hooks = getattr(_local, "hooks", None)
        if hooks is None or args:  # not one of our generate() calls: the model's own forward
            return self._forward(*args, **kwargs)
        return hooks.forward(kwargs)

    def restore_forward(self) -> None:
        self.model.forward = self._forward

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> list[SampledToken]:
        self.release(plan.released)
        failed: dict[int, str] = {}
        threads: dict[int, _SequenceThread] = {}
        for index, row in enumerate(plan.rows):
            try:
                threads[index] = self._start_or_feed(row)
            except Exception as exc:
                self.release([row.seq_id])
                failed[index] = f"{GENERATION_FAILED}: {type(exc).__name__}"
        # Every thread now asks for its forward (or fails): compute them, then collect scores.
        calls: dict[int, _Call] = {}
        for index, thread in threads.items():
            event = thread.next_event()
            if isinstance(event, _Call):
                calls[index] = event
            else:
                self._fail(index, plan.rows[index], event, failed)
        self._compute(calls, threads)
        scores: list[torch.Tensor] = []
        sampling_rows: list[PlanRow] = []
        for index in calls:
            event = threads[index].next_event()
            if isinstance(event, torch.Tensor):
                scores.append(event)
                sampling_rows.append(plan.rows[index])
            else:
                self._fail(index, plan.rows[index], event, failed)
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

    def _fail(self, index: int, row: PlanRow, event, failed: dict[int, str]) -> None:
        name = type(event).__name__ if isinstance(event, BaseException) else "unexpected event"
        self.release([row.seq_id])
        failed[index] = f"{GENERATION_FAILED}: {name}"

    def _start_or_feed(self, row: PlanRow) -> _SequenceThread:
        thread = self._threads.get(row.seq_id)
        if row.start == 0 or thread is None:
            if thread is not None:
                self.release([row.seq_id])
            # The whole prompt's inputs, images or not (PaliGemma's token types, for one).
            tokens, mm_inputs = row.token_ids, row.inputs.mm_inputs if row.inputs is not None else None
            if row.start:  # a forked choice: its first decode row recomputes the shared prompt
                context, mm_inputs = self._forked.pop(row.seq_id)
                mm_inputs = _token_types_to(mm_inputs, len(context))
                thread = self._threads[row.seq_id] = _SequenceThread(self, context, mm_inputs)
                self._prefill_alone(thread)
                thread.feed(row.token_ids[0])
                return thread
            thread = self._threads[row.seq_id] = _SequenceThread(self, tokens, mm_inputs)
            return thread
        if len(row.token_ids) != 1:
            raise RuntimeError("the generic path continues a sequence one token at a time")
        thread.feed(row.token_ids[0])
        return thread

    def check_lockstep(self, token_ids: list[int]) -> str | None:
        """None when generate() on `token_ids` asks for a forward and then hands over its scores
        through the hooks, as every step relies on; else what it did instead."""
        thread = _SequenceThread(self, token_ids, None)
        try:
            self._prefill_alone(thread)
        except Exception as exc:  # noqa: BLE001 - any way of not stepping is the answer
            return f"{type(exc).__name__}: {exc}"
        finally:
            thread.stop()
        return None

    def _prefill_alone(self, thread: _SequenceThread) -> None:
        """The prompt's forward, its scores dropped: a forked choice then decodes its first token
        as its parent did, prompt then token. Prompt and token as one prefill would be one call
        less, but not the same numbers on every model (DeepSeek-V3.2's sparse indexer picks other
        keys for a prefill than for a decode), and greedy choices of one request would differ."""
        call = thread.next_event()
        if not isinstance(call, _Call):
            raise call if isinstance(call, BaseException) else RuntimeError("unexpected event")
        self._compute({0: call}, {0: thread})
        scores = thread.next_event()
        if not isinstance(scores, torch.Tensor):
            raise scores if isinstance(scores, BaseException) else RuntimeError("unexpected event")

    def _compute(self, calls: dict[int, _Call], threads: dict[int, _SequenceThread]) -> None:
        """Run the step's forward calls in this thread: mergeable decode calls together, the rest
        one at a time with their sequence's module state in place. A merged forward that raises
        is run again call by call, so a failure stays with its own sequence."""
        with self.scope():  # the stream the generate() threads enqueue on
            self._compute_calls(calls, threads)

    def _may_merge(self, kwargs: dict) -> bool:
        """Module state is one per model, put in place for each call run alone. A merged forward
        never sets it, so it takes only calls that carry their own positions, from which Qwen-VL's
        forwards compute without reading rope_deltas; recurrent state on the modules, never."""
        if not self.batch_decode or self.recurrent_on_modules:
            return False
        return not self.stateful or kwargs.get("position_ids") is not None

    def _compute_calls(self, calls: dict[int, _Call], threads: dict[int, _SequenceThread]) -> None:
        candidates = [i for i in calls if self._may_merge(calls[i].kwargs)]
        grouped = [
            [candidates[position] for position in group]
            for group in groups([calls[i].kwargs for i in candidates], self._with_positions)
        ]
        grouped += [[i] for i in calls if i not in candidates]
        for members in grouped:
            if len(members) > 1:
                try:
                    outputs = run_merged(
                        self._forward, [calls[i].kwargs for i in members], with_positions=self._with_positions
                    )
                except Exception:
                    log.debug("merged decode forward raised; computing its calls one by one", exc_info=True)
                else:
                    self.merged_calls += len(members)
                    for index, output in zip(members, outputs, strict=True):
                        calls[index].result = output
                        calls[index].done.set()
                    continue
            for index in members:
                self._compute_one(calls[index], threads[index])

    def _compute_one(self, call: _Call, thread: _SequenceThread) -> None:
        self._restore(thread.module_state)
        try:
            call.result = self._forward(**call.kwargs)
        except Exception as exc:
            call.error = exc
        thread.module_state = [getattr(module, name) for module, name in self.stateful]
        call.done.set()

    def _restore(self, state: list | None) -> None:
        for index, (module, name) in enumerate(self.stateful):
            setattr(module, name, None if state is None else state[index])

    def release(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            thread = self._threads.pop(seq_id, None)
            if thread is not None:
                thread.stop()
            self._forked.pop(seq_id, None)
