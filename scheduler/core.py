"""The Scheduler: admission, routing and the lifecycle of replicas.

Created by the app's lifespan inside an anyio task group. `submit()` refuses at once when the
server cannot take the request (loading, draining, every queue full), prepares the prompt in a
worker thread (templates, tokenization, image decoding), checks lengths, and hands the request to
the least-loaded replica. Replica threads hand each step's outputs to the event loop with
`call_soon_threadsafe`: a replica never blocks on the loop, however busy it is (it shares the GIL
with it, which the `handoff` step timing measures).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any

import anyio

from models.devices import trim_host_memory
from models.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    ModelNotReadyError,
    OverloadedError,
    ShuttingDownError,
)
from models.images import DecodedImageCache
from models.params import PromptInput
from models.prompt import PreparedPrompt, PromptBuilder
from models.replica import build_replica
from scheduler.affinity import cached_prompt_tokens, routing_credit
from scheduler.config import SchedulerConfig
from scheduler.executor import Executor
from scheduler.job import Delivery, Job
from scheduler.lengths import PROMPT_PARAM, resolve_lengths
from scheduler.request import EngineRequest, RequestStream
from scheduler.router import pick_replica

log = logging.getLogger(__name__)
# Prompts with more characters than this (or any image) are prepared in the heavy lane.
HEAVY_CHARS = 32_768


def is_heavy(prompt: PromptInput) -> bool:
    """Whether preparing `prompt` may take long: images, or a lot of text or tokens."""
    if prompt.images:
        return True
    if prompt.text is not None:
        return len(prompt.text) > HEAVY_CHARS
    if prompt.token_ids is not None:
        return len(prompt.token_ids) > HEAVY_CHARS // 4
    # Not only the text: thousands of messages or parts, big template variables and tools cost
    # time too (a light lane held for 13 s by 1.9 million empty messages, every light request
    # waiting behind it), counted here at a flat cost per item.
    size = len(prompt.tools or ()) * 256
    for value in (prompt.chat_template_kwargs or {}).values():
        size += 64 + (len(value) if isinstance(value, (str, list, dict)) else 0)
    for message in prompt.messages or ():
        size += 16
        content = message.get("content")
        if isinstance(content, str):
            size += len(content)
        elif isinstance(content, list):
            size += sum(16 + len(p.get("text") or "") for p in content if isinstance(p, dict))
    return size > HEAVY_CHARS


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.executors = [
            Executor(f"{i}", device, self._builder_for(device), self._deliver, config.executor)
            for i, device in enumerate(config.devices)
        ]
        self.started_at = time.monotonic()
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._prompt_builders: tuple[PromptBuilder, PromptBuilder] | None = None  # light, heavy lane
        self._builder_lock = anyio.Lock()
        # Preparing prompts (templates, tokenization, image decoding, grammar compilation) is CPU
        # work off the event loop, in two lanes: heavy inputs (images, long texts, big grammars)
        # take turns in one, so they can never hold back the light ones in the other. Each lane
        # has a prompt builder (a tokenizer) of its own: transformers sets `split_special_tokens`
        # on the shared Rust tokenizer for the length of one call, and a prompt tokenized in the
        # other lane meanwhile had its special tokens split into text.
        self._light_lane = anyio.CapacityLimiter(1)
        self._heavy_lane = anyio.CapacityLimiter(1)
        self.image_cache = DecodedImageCache()
        self._inflight: dict[RequestStream, tuple[Executor, int]] = {}

    def _builder_for(self, device: str) -> Callable[[], Any]:
        spec = dataclasses.replace(self.config.load, device=device)
        return lambda: build_replica(spec, self.config.replica)

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every replica thread; loading goes on in the background while /health says so."""
        self._loop = asyncio.get_running_loop()
        for executor in self.executors:
            executor.start()

    async def drain(self, grace_s: float) -> None:
        """Refuse new work, give in-flight requests `grace_s` to finish, then stop the replicas:
        whatever is still running ends with a ShuttingDownError. Later calls return at once."""
        if self.draining:
            return
        self.draining = True
        log.info("shutting down: draining %d in-flight request(s) (up to %gs)", len(self._inflight), grace_s)
        with anyio.move_on_after(grace_s):
            while self._inflight:
                await anyio.sleep(0.05)
        if self._inflight:
            log.warning(
                "shutdown: %d request(s) still running after %.0fs; stopping them",
                len(self._inflight),
                grace_s,
            )
        for executor in self.executors:
            executor.stop()
        await anyio.to_thread.run_sync(self._join_all)

    def _join_all(self) -> None:
        # A replica still loading holds no request and cannot be interrupted inside
        # from_pretrained; its thread is a daemon, so the process need not wait for it (waiting
        # outlasted granian's kill timeout when a SIGTERM came during a slow load).
        for executor in self.executors:
            if executor.state != "loading":
                executor.join(timeout=10)

    # -- readiness -----------------------------------------------------------------------------
    @property
    def status(self) -> str:
        states = [e.state for e in self.executors]
        if self.draining:
            return "draining"
        if any(s in ("failed", "stopped") for s in states):
            return "degraded"
        if all(s == "ready" for s in states):
            return "ready"
        return "loading"

    @property
    def crashed(self) -> bool:
        """A replica's step loop died after serving (liveness fails, so the container restarts)."""
        return any(e.crashed for e in self.executors)

    @property
    def ready_replica(self):
        executor = self._ready_executor
        return executor.replica if executor is not None else None

    @property
    def _ready_executor(self) -> Executor | None:
        return next((e for e in self.executors if e.state == "ready" and e.replica is not None), None)

    def replica_stats(self) -> list[dict[str, Any]]:
        stats = []
        for e in self.executors:
            item = {
                "name": e.name,
                "device": e.device,
                "state": e.state,
                "outstanding_tokens": e.remaining_tokens,
                **e.stats(),
            }
            replica = e.replica
            if replica is not None:
                item["path"] = replica.path
                item["path_reason"] = replica.path_reason
                item["attention"] = replica.attention
                item["kernels"] = replica.runner.backend
                item["cuda_graphs"] = getattr(replica.runner, "graphs_status", "off")
                item["dtype"] = str(replica.loaded.dtype).removeprefix("torch.")
                item["kv_block_size"] = replica.block_size
                item["kv_pool_bytes"] = replica.kv_pool_bytes
                item["prefix_caching"] = replica.prefix_caching
            if e.error:
                item["error"] = e.error
            stats.append(item)
        return stats

    # -- requests ------------------------------------------------------------------------------
    async def submit(self, request: EngineRequest) -> RequestStream:
        return self._enqueue(*await self._admit(request))

    async def submit_all(self, requests: list[EngineRequest]) -> list[RequestStream]:
        """A multi-prompt request's prompts, admitted all or none: each prepared first, then all
        queued with no await between, so that concurrent requests cannot each take part of the
        room and all be refused (three 4-prompt requests on room for 8 were each refused)."""
        self.check_room(requests[0].n, len(requests))
        admitted = [await self._admit(request) for request in requests]
        self.check_room(requests[0].n, len(requests))
        streams: list[RequestStream] = []
        try:
            for request, prepared, compiled_on, held in admitted:
                streams.append(self._enqueue(request, prepared, compiled_on, held))
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        return streams

    async def _admit(
        self, request: EngineRequest
    ) -> tuple[EngineRequest, PreparedPrompt, Executor | None, dict[Executor, int]]:
        """Everything a request must pass before it is queued: room now, its prompt prepared,
        its lengths, its grammar compiled (and the replica that compiled it), its worst case in
        the KV pool; and how much of its prompt each replica's prefix cache holds (walked once:
        a long prompt's walk is milliseconds on the event loop)."""
        self.check_room(request.n)
        heavy = is_heavy(request.prompt)
        builder = await self._builder(heavy)
        prepared = await self._prepare(builder.prepare, request.prompt, heavy=heavy)
        defaulted = request.params.max_tokens is None
        request = resolve_lengths(
            request, prepared, builder, self.ready_replica, self.config.replica.max_new_tokens
        )
        held = cached_prompt_tokens(prepared, self.executors)
        executor = self._pick(request, prepared, held)
        if executor is None:
            self.check_room(request.n)
            raise OverloadedError(
                "every replica queue is full; retry shortly", retry_after_s=self.retry_after_s()
            )
        if request.params.prompt_logprobs is not None and not executor.replica.runner.scores_prompts:
            raise InvalidRequestError(
                "prompt logprobs (echo with logprobs, prompt_logprobs) are not available for this model: "
                "it runs on the generic path, whose generate() keeps only the last position's logits",
                param="prompt_logprobs",
            )
        if request.params.grammar is not None:
            # Compiled off the loop by the replica that will run it: a bad schema is a 400 now, and
            # admission later only copies the cached matcher.
            grammar = request.params.grammar
            await self._prepare(
                executor.replica.grammars.validate, grammar, heavy=len(grammar.source) > HEAVY_CHARS
            )
        room = executor.max_tokens_that_fit(len(prepared.token_ids), request.n)
        if defaulted and 0 < room < request.params.max_tokens:
            # A default is lowered to what the KV pool holds, as it is to the context's room.
            request = dataclasses.replace(
                request, params=dataclasses.replace(request.params, max_tokens=room)
            )
        if not executor.fits(len(prepared.token_ids), request.params.max_tokens, request.n):
            # The field at fault: the prompt where it would not fit with one token to generate, n
            # where one choice would fit, else max_tokens.
            if not executor.fits(len(prepared.token_ids), 1, 1):
                param = PROMPT_PARAM.get(request.kind, "messages")
            elif request.n > 1 and executor.fits(len(prepared.token_ids), request.params.max_tokens, 1):
                param = "n"
            else:
                param = "max_tokens"
            limit = f"max_tokens ({request.params.max_tokens}{', the default' if defaulted else ''})"
            raise ContextLengthExceededError(
                f"the prompt ({len(prepared.token_ids)} tokens) plus {limit} for {request.n} choice(s) does not "
                "fit this server's KV cache memory; reduce the prompt, max_tokens or n",
                param=param,
            )
        return request, prepared, executor if request.params.grammar is not None else None, held

    def _pick(
        self, request: EngineRequest, prepared: PreparedPrompt, held: dict[Executor, int]
    ) -> Executor | None:
        """The router's replica for `request`, each replica's cached prefix of its prompt taken
        off that replica's load up to the request's own work (`affinity.routing_credit`)."""
        work = request.params.max_tokens * request.n
        return pick_replica(self.executors, request.n, routing_credit(held, len(prepared.token_ids), work))

    def _enqueue(
        self,
        request: EngineRequest,
        prepared: PreparedPrompt,
        compiled_on: Executor | None = None,
        held: dict[Executor, int] | None = None,
    ) -> RequestStream:
        """Queue an admitted request on the replica the router picks now (no await: what the
        room check saw is what the queue gets). One with a grammar stays on the replica that
        compiled it, unless the router's pick has it compiled too or would start it sooner
        (free rows where the other has none): another replica compiles it again inside its step
        loop, its rows waiting meanwhile; yet a burst kept there queued behind full rows."""
        self._check_can_accept()
        n = request.n
        held = held or {}
        executor = self._pick(request, prepared, held)
        if (
            compiled_on is not None
            and executor is not compiled_on
            and compiled_on.is_ready
            and compiled_on.has_room(n)
            and (executor is None or compiled_on.waits(n) <= executor.waits(n))
            and (executor is None or not executor.replica.grammars.is_compiled(request.params.grammar))
        ):
            executor = compiled_on
        if executor is None:
            self.check_room(request.n)
            raise OverloadedError(
                "every replica queue is full; retry shortly", retry_after_s=self.retry_after_s()
            )
        stream = RequestStream(request, prepared)
        stream.replica_name = executor.name
        stream._on_cancel = lambda _stream: executor.wake()
        # The prompt tokens the replica's cache holds are no work for it, from the start: counted
        # until scheduled, a replica holding several conversations' histories looked busy by
        # them, and their next turns went elsewhere.
        credit = held.get(executor, 0)
        cost = len(prepared.token_ids) - credit + request.params.max_tokens * request.n
        executor.submit(Job(stream, prepared, cost, credit=credit))
        executor.outstanding_tokens += cost
        self._inflight[stream] = (executor, cost)
        return stream

    def check_room(self, n: int = 1, prompts: int = 1) -> None:
        """Refuse at once what cannot be queued now: `prompts` requests of `n` sequences each (a
        multi-prompt completion's prompts go to replicas one by one, each prompt's n choices to
        one) must find queue room now. What no queue could ever hold is a 400."""
        self._check_can_accept()
        rows = self.config.executor.max_batch_size
        if n > rows:
            # All choices of a request run together, sharing one prefill; more than the batch holds
            # could never be admitted.
            raise InvalidRequestError(
                f"n={n} choices cannot run together on this server: at most {rows} sequences are batched "
                "(MAX_BATCH_SIZE); send several requests or lower n",
                param="n",
            )
        # A replica takes its free rows' worth, then MAX_QUEUE_SIZE waiting (`Executor.room`), and
        # a prompt's n choices go to one replica: what the replicas serving or loading could never
        # hold is the request's fault (counted in sequences alone, 5 prompts of n=3 on two
        # replicas of 8 were "retry shortly" forever).
        limit = self.config.executor.max_queue_size + rows
        replicas = max(1, sum(e.is_ready or e.state == "loading" for e in self.executors))
        if prompts > (limit // n) * replicas:
            raise InvalidRequestError(
                f"this request's {prompts} prompts of n={n} choices cannot all be queued: at most "
                f"{(limit // n) * replicas} fit on this server ({limit} sequences per replica, MAX_BATCH_SIZE "
                "rows plus MAX_QUEUE_SIZE waiting, each prompt's choices on one replica): send fewer prompts "
                "or a lower n",
                param="prompt",
            )
        ready = [e for e in self.executors if e.is_ready]
        free = sorted((e.room for e in ready), reverse=True)
        for _ in range(prompts):
            if not free or free[0] < n:
                raise OverloadedError(
                    "every replica queue is full; retry shortly", retry_after_s=self.retry_after_s()
                )
            free[0] -= n
            free.sort(reverse=True)

    def retry_after_s(self) -> int:
        """When to come back: the work already accepted (prompt tokens to compute and tokens to
        generate) over the recent rate of the ready replicas, plus up to a quarter more at random,
        between 1 s and 60 s. The openai client waits exactly Retry-After: refused clients given
        one value came back in the same 10 ms, and were refused together again."""
        ready = [e for e in self.executors if e.is_ready]
        rate = sum(e.work_per_s for e in ready)
        if not ready or rate <= 0:
            return self.config.retry_after_s
        backlog = sum(e.remaining_tokens for e in ready)
        base = math.ceil(backlog / rate)
        return max(1, min(60, base + random.randint(0, max(1, base // 4))))

    def _check_can_accept(self) -> None:
        if self.draining:
            # The same code as the requests the drain stops: one thing for a client to retry on.
            raise ShuttingDownError(
                "the server is shutting down; retry on another replica",
                retry_after_s=self.config.retry_after_s,
            )
        ready = [e for e in self.executors if e.is_ready]
        if not ready:
            if any(e.state == "loading" for e in self.executors):
                raise ModelNotReadyError("the model is still loading; retry shortly")
            if self.crashed:
                raise ModelNotReadyError("the model stopped after an internal error; see the server log")
            raise ModelNotReadyError("the model failed to load; see the server log")

    # -- prompt utilities (apply_template, tokenize, detokenize) ---------------------------------
    async def _builder(self, heavy: bool) -> PromptBuilder:
        """The prompt builder of the lane that `heavy` work runs in (`_prepare`)."""
        if self._prompt_builders is None:
            async with self._builder_lock:
                if self._prompt_builders is None:
                    replica = self.ready_replica
                    if replica is None:
                        self._check_can_accept()
                    light = await anyio.to_thread.run_sync(self._make_builder, replica)
                    heavy_builder = await anyio.to_thread.run_sync(self._make_builder, replica)
                    self._prompt_builders = (light, heavy_builder)
        return self._prompt_builders[heavy]

    def _make_builder(self, replica) -> PromptBuilder:
        loaded = replica.loaded
        # Its own copies: a fast tokenizer must not be used by two threads at once.
        processor = copy.deepcopy(loaded.processor) if loaded.processor is not None else None
        tokenizer = processor.tokenizer if processor is not None else copy.deepcopy(loaded.tokenizer)
        return PromptBuilder.for_model(
            loaded,
            tokenizer=tokenizer,
            processor=processor,
            max_input_tokens=self.config.replica.max_input_tokens,
            image_limits=self.config.image_limits,
            image_cache=self.image_cache,
        )

    async def render(self, prompt: PromptInput) -> tuple[str, list[str]]:
        """The rendered prompt, and what rendering left out (the request's warnings)."""
        self._check_loaded()
        heavy = is_heavy(prompt)
        builder = await self._builder(heavy)
        text = await self._prepare(builder.render, prompt, heavy=heavy)
        return text, builder.template_warnings(prompt)

    async def tokenize(self, prompt: PromptInput) -> PreparedPrompt:
        self._check_loaded()
        heavy = is_heavy(prompt)
        return await self._prepare((await self._builder(heavy)).prepare, prompt, heavy=heavy)

    async def detokenize(self, token_ids: list[int]) -> str:
        self._check_loaded()
        heavy = len(token_ids) > HEAVY_CHARS // 4
        return await self._prepare((await self._builder(heavy)).detokenize, token_ids, heavy=heavy)

    async def _prepare(self, work: Callable, argument: Any, *, heavy: bool) -> Any:
        if not heavy:
            return await anyio.to_thread.run_sync(work, argument, limiter=self._light_lane)
        try:
            return await anyio.to_thread.run_sync(work, argument, limiter=self._heavy_lane)
        finally:
            # A long prompt or big images leave large freed buffers in the heap: give them back.
            await anyio.to_thread.run_sync(trim_host_memory, limiter=self._heavy_lane)

    def _check_loaded(self) -> None:
        if self.ready_replica is None:
            self._check_can_accept()

    @property
    def max_model_len(self) -> int | None:
        """The most tokens one sequence may hold here (vLLM's max_model_len): the context, or less
        where MAX_INPUT_TOKENS + MAX_NEW_TOKENS_DEFAULT or the KV pool hold less."""
        executor = self._ready_executor
        if executor is None:
            return None
        replica = executor.replica
        return min(replica.loaded.max_context, replica.max_seq_len, executor.max_tokens_that_fit(0, 1))

    @property
    def chat_template(self) -> str | None:
        """The model's chat template ("" when it has none); None until a replica has loaded. A
        checkpoint's named "tool_use" template where it has one: calls are rendered, and so written
        by the model, in its format."""
        replica = self.ready_replica
        if replica is None:
            return None
        return replica.loaded.tool_chat_template or replica.loaded.chat_template or ""

    @property
    def is_vision(self) -> bool | None:
        replica = self.ready_replica
        return replica.loaded.is_vision if replica is not None else None

    # -- outputs -------------------------------------------------------------------------------
    def _deliver(self, items: Delivery) -> None:
        """Called from replica threads once per step; schedules the hand-off and returns at once."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._apply, items)
        except RuntimeError:
            pass  # the loop is closed (shutdown): nobody is listening any more

    def _apply(self, items: Delivery) -> None:
        for stream, index, delta in items:
            stream.push(
                index,
                delta.text,
                delta.token_ids,
                delta.logprobs,
                delta.finish_reason,
                delta.error,
                delta.prompt_logprobs,
            )
            if stream.finished:
                self._retire(stream)

    def _retire(self, stream: RequestStream) -> None:
        entry = self._inflight.pop(stream, None)
        if entry is None:
            return
        executor, cost = entry
        executor.outstanding_tokens -= cost
