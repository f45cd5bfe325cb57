"""The scheduler when things go wrong: draining, a model that fails to load, a step loop that
crashes (its requests are answered, the server says it crashed), a crash during the wind-down."""

from __future__ import annotations

import dataclasses

import anyio
import pytest

from models.prompt import PreparedPrompt
from scheduler.core import Scheduler
from scheduler.errors import GenerationError, ModelNotReadyError, OverloadedError
from scheduler.job import Job
from scheduler.request import RequestStream
from tests.unit.configs import engine_config
from tests.unit.scheduler_harness import request, running_scheduler

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def test_draining_refuses_new_work(tiny_text_path):
    async with running_scheduler(tiny_text_path) as scheduler:
        scheduler.draining = True
        with pytest.raises(OverloadedError):
            await scheduler.submit(request(0))
        scheduler.draining = False


async def test_a_model_that_fails_to_load_makes_the_server_degraded(tmp_path):
    config = engine_config(tmp_path / "missing")
    scheduler = Scheduler(config)
    await scheduler.start()
    with anyio.fail_after(30):
        while scheduler.status == "loading":
            await anyio.sleep(0.05)
    assert scheduler.status == "degraded"
    with pytest.raises(ModelNotReadyError):
        await scheduler.submit(request(0))
    await scheduler.drain(1)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the crash itself
async def test_a_crashed_step_loop_answers_its_requests_and_says_so(tiny_text_path, monkeypatch):
    """A replica whose step loop dies ends its requests with an error, and the scheduler says it
    crashed (liveness fails on that, so the container restarts): not that the model failed to load."""
    async with running_scheduler(tiny_text_path) as scheduler:
        executor = scheduler.executors[0]
        assert not scheduler.crashed

        def broken_step():
            raise RuntimeError("a bug in the step loop")

        monkeypatch.setattr(executor, "step", broken_step)
        stream = await scheduler.submit(request(0))
        with anyio.fail_after(30):
            failed = [update async for update in stream]
        assert any(choice.finish_reason == "error" for update in failed for choice in update.choices)
        # It never started: a 503 to retry (other replicas may serve it), not a 500.
        assert isinstance(failed[-1].error, OverloadedError) and "retry" in failed[-1].error.message
        assert scheduler.crashed and scheduler.status == "degraded"
        with pytest.raises(ModelNotReadyError, match="stopped after an internal error"):
            await scheduler.submit(request(1))
        # A job that reached the replica after its inbox was failed (the crash fell between the
        # scheduler's readiness check and the hand-over) is refused, not left there forever.
        prepared = PreparedPrompt([1, 2, 3])
        with pytest.raises(OverloadedError, match="stopped after an internal error"):
            executor.submit(Job(RequestStream(request(2), prepared), prepared, cost=3))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the crash itself
async def test_a_crash_that_breaks_the_wind_down_still_answers_every_request(tiny_text_path, monkeypatch):
    async with running_scheduler(tiny_text_path) as scheduler:
        executor = scheduler.executors[0]
        streams = [await scheduler.submit(request(i, max_tokens=40)) for i in range(3)]
        whole = await scheduler.submit(dataclasses.replace(request(3, max_tokens=40), streamed=False))
        with anyio.fail_after(30):
            while not all(s.first_token_at for s in [*streams, whole]):
                await anyio.sleep(0.01)

        def broken(*_args, **_kwargs):
            raise RuntimeError("the batch's books are broken")

        monkeypatch.setattr(executor, "_finish", broken)
        monkeypatch.setattr(executor, "step", broken)
        with anyio.fail_after(30):
            for stream in streams:
                updates = [update async for update in stream]
                assert updates[-1].choices[-1].finish_reason == "error"
                assert isinstance(updates[-1].error, GenerationError)  # tokens were out: a 500
            # Read whole, the answer had reached no one: a 503 to retry on another replica.
            updates = [update async for update in whole]
            assert isinstance(updates[-1].error, OverloadedError)


async def test_a_drain_during_a_load_does_not_wait_for_the_load(tiny_text_path, monkeypatch):
    """A SIGTERM while a slow model loads: the drain waited up to 10 s for the loading thread
    (which holds no request and cannot be interrupted), past granian's kill timeout."""
    import threading
    import time

    release = threading.Event()

    def slow_load():
        release.wait(60)
        raise RuntimeError("load abandoned by the test")

    monkeypatch.setattr(Scheduler, "_builder_for", lambda self, device: slow_load)
    scheduler = Scheduler(engine_config(tiny_text_path))
    await scheduler.start()
    try:
        assert scheduler.status == "loading"
        started = time.monotonic()
        await scheduler.drain(0)
        assert time.monotonic() - started < 2 and scheduler.status == "draining"
    finally:
        release.set()
