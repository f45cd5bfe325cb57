"""Application lifespan: build the Scheduler inside an anyio task group, load replicas in the
background (so /health answers `loading` meanwhile), drain in-flight requests on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from litestar import Litestar

from app import early_signals
from app.http_limits import BodyReads
from app.media import new_image_client
from app.services import Services
from app.settings import Settings
from scheduler.config import (
    ExecutorConfig,
    ImageLimits,
    LoadSpec,
    ReplicaConfig,
    SchedulerConfig,
    resolve_devices,
    set_cpu_threads,
)
from scheduler.core import Scheduler

log = logging.getLogger("docoserve.server")
# Measured on this project's 2-core CI machine (docs/BENCHMARKS.md): 128 halves median TTFT against
# 512 for 11% less throughput. GPUs run big prefill chunks at little extra step latency.
CPU_PREFILL_TOKENS = 128
GPU_PREFILL_TOKENS = 2048


def scheduler_config(settings: Settings) -> SchedulerConfig:
    devices = resolve_devices(**settings.device_selection())
    on_cpu = all(d == "cpu" for d in devices)
    return SchedulerConfig(
        load=LoadSpec(
            source=settings.model_path,
            revision=settings.model_revision,
            trust_remote_code=settings.trust_remote_code,
            token=settings.hf_token,
            cache_dir=settings.cache_dir,
            dtype=settings.dtype,
            attn_impl=settings.attn_impl,
            attn_strict=settings.attn_strict,
            redact_source=settings.redact_source,
            progress=settings.progress_logs,
            chat_template=settings.chat_template,
        ),
        devices=tuple(devices),
        replica=ReplicaConfig(
            max_batch_size=settings.max_batch_size,
            max_input_tokens=settings.max_input_tokens,
            max_new_tokens=settings.default_max_tokens,
            pack_cpu_linears=settings.cpu_packed_linears,
            kv_cache_budget_bytes=int(settings.kv_cache_max_gib * 2**30) or None,
            kv_cache_gpu_fraction=settings.kv_cache_gpu_fraction,
            kv_block_size=settings.kv_block_size or None,
            enable_prefix_caching=settings.enable_prefix_caching,
            decode_graphs="off" if settings.enforce_eager else "auto",
        ),
        executor=ExecutorConfig(
            max_batch_size=settings.max_batch_size,
            max_queue_size=settings.max_queue_size,
            max_prefill_tokens=settings.max_prefill_tokens
            or (CPU_PREFILL_TOKENS if on_cpu else GPU_PREFILL_TOKENS),
            batch_timeout_s=settings.batch_timeout_ms / 1000.0,
            stream_interval=settings.stream_interval,
        ),
        image_limits=ImageLimits(
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            max_side=settings.max_image_size,
        ),
    )


@contextlib.asynccontextmanager
async def serve_model(app: Litestar) -> AsyncIterator[None]:
    services = app.state.services
    settings: Settings = services.settings
    config = scheduler_config(settings)
    if all(d == "cpu" for d in config.devices):
        threads = set_cpu_threads(len(config.devices))
        log.info(
            "[server] CPU threads per replica: %d (OMP_NUM_THREADS, else usable cores / replicas)", threads
        )
    # Replica threads hold the GIL between torch ops; a 1 ms switch interval (default 5 ms) lets
    # the event loop answer /health and flush streams promptly (measured: lower /health max, same
    # throughput; docs/BENCHMARKS.md).
    sys.setswitchinterval(0.001)
    log.info("[server] transformers %s from %s", *transformers_origin())  # the seed's startup line
    log.info("[server] model=%s devices=%s", settings.model_name, ",".join(config.devices))
    translator = services.translator
    async with contextlib.AsyncExitStack() as stack:
        translator.image_client = await stack.enter_async_context(new_image_client(translator.image_policy))
        task_group = await stack.enter_async_context(anyio.create_task_group())
        scheduler = Scheduler(config)
        services.scheduler = scheduler
        translator.accepts_images = lambda: scheduler.is_vision
        _drain_before_granian_stops(scheduler, settings, app.state.body_reads)
        # A stop signal that came while the worker was importing: the model is not loaded at all
        # (the load went on in the drain's shadow and outlasted granian's kill timeout).
        if early_signals.received() is None:
            await scheduler.start()
        task_group.start_soon(_announce_readiness, scheduler, services)
        try:
            yield
        finally:
            await scheduler.drain(settings.shutdown_grace_s)
            task_group.cancel_scope.cancel()


def _drain_before_granian_stops(scheduler: Scheduler, settings: Settings, body_reads: BodyReads) -> None:
    """On SIGTERM/SIGINT, granian stops accepting connections at once, waits for the open ones,
    and only then runs the lifespan's shutdown; a stream still open at its kill timeout was cut
    with no error event. So the signal is taken here first: readiness turns false and new
    requests get 503 at once, in-flight work gets SHUTDOWN_GRACE_S, whatever is left then ends
    with an error (an error event and `[DONE]` on streams, 503 otherwise), and only then is
    granian's own handler run. granian's handler is the asyncio loop's (entrypoint.py pins the
    asyncio loop); without one there is nothing to intercept and the lifespan drains as before."""
    loop = asyncio.get_running_loop()
    handlers = getattr(loop, "_signal_handlers", {})
    draining: set[asyncio.Task] = set()  # a reference, so the task is not collected mid-drain
    for sig in (signal.SIGTERM, signal.SIGINT):
        granian_handler = handlers.get(sig)
        if granian_handler is None:
            continue

        def on_signal(sig=sig, granian_handler=granian_handler) -> None:
            if scheduler.draining:
                # Repeats are ignored: supervisors that signal the whole process group deliver
                # SIGTERM twice (theirs and granian's main process's). Its kill timeout is the backstop.
                return
            log.info(
                "[server] %s: draining (up to %gs), then stopping",
                signal.Signals(sig).name,
                settings.shutdown_grace_s,
            )
            body_reads.stop()  # uploads still arriving end now: they would be refused as new work
            # A signal handler runs outside any task: start the drain as a task of its own.
            task = loop.create_task(_drain_then_stop(scheduler, settings.shutdown_grace_s, granian_handler))
            draining.add(task)
            task.add_done_callback(draining.discard)

        loop.add_signal_handler(sig, on_signal)
        if early_signals.received() == sig:  # it came while the worker was importing the app
            loop.call_soon(on_signal)


async def _drain_then_stop(scheduler: Scheduler, grace_s: float, granian_handler) -> None:
    await scheduler.drain(grace_s)
    await anyio.sleep(0.1)  # the failed requests' last events go out before connections close
    granian_handler._run()


def transformers_origin() -> tuple[str, str]:
    import transformers

    return transformers.__version__, str(Path(transformers.__file__).parent)


def startup_banner(settings: Settings, base_url: str, seconds: float) -> list[str]:
    """What an operator needs to know once the server answers: where, whether a key is needed,
    the cap on answers, and whether the model is the random-weight demo."""
    lines = [
        f"startup took {seconds:.1f}s",
        f"OpenAI-compatible API at {base_url}/v1 (model name {settings.model_name!r}); docs at {base_url}/docs",
        "auth: a bearer key (API_KEY) is required for /v1/* and /docs"
        if settings.api_key
        else "warning: auth is off (no API_KEY): anyone who reaches this port can use the model",
        f"answers are capped at {settings.default_max_tokens} new tokens per request "
        "(MAX_NEW_TOKENS_DEFAULT / --default-max-tokens raises it)",
    ]
    if settings.model_path.startswith("builtin:"):
        lines.append(
            f"warning: serving the built-in demo model {settings.model_path}: random weights, its answers are noise; "
            "set MODEL_PATH to serve a real model"
        )
    return lines


async def _announce_readiness(scheduler: Scheduler, services: Services) -> None:
    """The seed's startup heartbeat (PROGRESS_LOGS), its readiness line, and the tool-call format."""
    settings: Settings = services.settings
    started = time.monotonic()
    last_line = started
    while scheduler.status == "loading":
        await anyio.sleep(0.5)
        if not settings.progress_logs:
            continue
        # The seed's dots are for a terminal; with LOG_FORMAT=json every line must stay one JSON
        # object, so only the periodic line is written there, as a log record.
        plain = settings.log_format == "plain"
        if plain:
            print(".", end="", flush=True)
        if time.monotonic() - last_line >= 5:
            last_line = time.monotonic()
            if plain:
                print(f"\n[startup] loading… {last_line - started:.0f}s", flush=True)
            else:
                log.info("[startup] loading… %.0fs", last_line - started)
    # Everything loaded so far lives for the whole process: move it out of the cyclic GC's view so
    # collections stay short while serving (they pause every thread, the event loop included).
    gc.collect()
    gc.freeze()
    base = f"http://{settings.host}:{settings.port}"
    url = f"{base}/health"
    if scheduler.status == "ready":
        log.info("[server] Ready. Health: %s", url)  # the seed's line, word for word
        for line in startup_banner(settings, base, time.monotonic() - started):
            log.log(logging.WARNING if line.startswith("warning:") else logging.INFO, "[server] %s", line)
        services.tool_format()  # settled now (it logs which), if no request settled it first
    elif scheduler.draining:  # stopped while starting (SIGTERM): not a failure
        log.info("[server] stopped before it was ready (shutting down)")
    else:
        errors = "; ".join(f"replica {e.name}: {e.error}" for e in scheduler.executors if e.error)
        log.error("[server] Not ready (degraded). Health: %s Error: %s", url, errors or scheduler.status)
