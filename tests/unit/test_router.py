"""Several replicas in process: the router's choice, admission across replica queues, where a
request with a grammar runs, and Retry-After from the backlog."""

from __future__ import annotations

import collections

import anyio
import pytest

from scheduler.core import Scheduler
from scheduler.errors import InvalidRequestError, OverloadedError
from scheduler.router import pick_replica
from tests.unit.configs import engine_config
from tests.unit.scheduler_harness import consume, request, running_scheduler

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def test_two_cpu_replicas_share_the_load(tiny_text_path):
    async with running_scheduler(tiny_text_path, cpu_replicas=2) as scheduler:
        streams = [await scheduler.submit(request(i, max_tokens=12)) for i in range(8)]
        assert {s.replica_name for s in streams} == {"0", "1"}
        async with anyio.create_task_group() as tg:
            for s in streams:
                tg.start_soon(consume, s)
        assert all(e.steps > 0 for e in scheduler.executors)


async def test_the_router_ranks_replicas_by_the_work_they_have_left(tiny_text_path):
    """Ranked by the work requests were admitted with, a replica near the end of a long answer
    looked busier than one just starting a shorter one, and a short request waited behind it."""
    async with running_scheduler(
        tiny_text_path, cpu_replicas=2, max_batch_size=1, max_new_tokens=400
    ) as scheduler:
        nearly_done = await scheduler.submit(request(0, max_tokens=300))
        with anyio.fail_after(60):
            while nearly_done.completion_tokens < 250:
                await anyio.sleep(0.005)
        starting = await scheduler.submit(request(1, max_tokens=280))
        with anyio.fail_after(60):
            while not starting.completion_tokens:
                await anyio.sleep(0.005)
        short = await scheduler.submit(request(2, max_tokens=4))
        assert (nearly_done.replica_name, starting.replica_name) == ("0", "1")
        assert short.replica_name == "0"
        for stream in (nearly_done, starting, short):
            await consume(stream)
        assert all(e.remaining_tokens == 0 for e in scheduler.executors)


class FakeReplica:
    def __init__(self, name, load, ready=True, room=True, depth=0, free_rows=0):
        self.name, self.remaining_tokens, self._ready, self._room, self._depth = (
            name,
            load,
            ready,
            room,
            depth,
        )
        self._free_rows = free_rows

    @property
    def is_ready(self):
        return self._ready

    @property
    def queue_depth(self):
        return self._depth

    def has_room(self, sequences=1):
        return self._room

    def waits(self, sequences=1):
        return self._depth + sequences > self._free_rows


def test_router_picks_the_least_loaded_ready_replica_with_room():
    replicas = [
        FakeReplica("a", 50),
        FakeReplica("b", 10),
        FakeReplica("c", 5, ready=False),
        FakeReplica("d", 1, room=False),
    ]
    assert pick_replica(replicas).name == "b"
    assert pick_replica([FakeReplica("x", 0, ready=False)]) is None
    tie = [FakeReplica("a", 10, depth=3), FakeReplica("b", 10, depth=1)]
    assert pick_replica(tie).name == "b"
    # A free row now beats less work behind a full batch: the request starts at the next step.
    rows = [FakeReplica("long", 1900, free_rows=1), FakeReplica("full", 1400, depth=2)]
    assert pick_replica(rows).name == "long"
    assert pick_replica(rows, sequences=2).name == "full"  # neither starts two at once: less work


def test_a_cached_prompt_counts_as_work_a_replica_need_not_do_but_never_outranks_a_free_row():
    busy, idle = FakeReplica("holds-history", 300, free_rows=4), FakeReplica("idle", 0, free_rows=4)
    assert pick_replica([busy, idle]).name == "idle"
    assert pick_replica([busy, idle], cached={busy: 512}).name == "holds-history"
    assert pick_replica([busy, idle], cached={busy: 256}).name == "idle"  # more queued than it saves
    full = FakeReplica("holds-history", 0, depth=1, free_rows=1)
    assert pick_replica([full, idle], cached={full: 4096}).name == "idle"


LONG_HISTORY = " ".join(f"turn{i} said something" for i in range(60))


async def test_a_conversation_goes_back_to_the_replica_that_holds_its_history(tiny_text_path):
    """Ranked by load alone, the next turn went to the idle replica and its whole history was
    computed again there: with R replicas a conversation found its prefix about 1 in R turns."""
    async with running_scheduler(
        tiny_text_path, cpu_replicas=2, max_input_tokens=600, max_new_tokens=400
    ) as scheduler:
        first = await scheduler.submit(request(0, text=LONG_HISTORY, max_tokens=2))
        await consume(first)
        assert first.replica_name == "0"
        # Work on the history's replica, less than the history saves and than the turn brings
        # (its answer may be 300 tokens), none on the other.
        busy = await scheduler.submit(request(1, text="x", max_tokens=200))
        assert busy.replica_name == "0"
        queued_before = scheduler.executors[0].outstanding_tokens
        next_turn = await scheduler.submit(request(2, text=LONG_HISTORY, max_tokens=300))
        assert next_turn.replica_name == "0"
        added = scheduler.executors[0].outstanding_tokens - queued_before
        with anyio.fail_after(60):
            while not next_turn.first_token_at:
                await anyio.sleep(0.005)
        assert next_turn.cached_tokens >= first.prompt_tokens - 2 * scheduler.executors[0].replica.block_size
        # The history it holds is no work for it, even while the turn waits to be scheduled: counted
        # until then, a replica holding several histories looked busy by them.
        assert added == next_turn.prompt_tokens - next_turn.cached_tokens + 300
        for stream in (busy, next_turn):
            stream.cancel()
            await consume(stream)
        # A prompt neither holds goes by load: the idle replica.
        other = await scheduler.submit(request(3, text="something else entirely", max_tokens=390))
        elsewhere = await scheduler.submit(request(4, text="and another thing", max_tokens=2))
        assert (other.replica_name, elsewhere.replica_name) == ("0", "1")
        other.cancel()
        for stream in (other, elsewhere):
            await consume(stream)


async def test_a_long_prefix_cached_on_one_replica_does_not_pull_every_short_request_there(tiny_text_path):
    """Counted whole, a shared system prompt cached on one replica outweighed any load: with
    short answers every request went there while the other replica idled, never computing the
    prefix itself. The credit is at most the request's own work."""
    async with running_scheduler(
        tiny_text_path, cpu_replicas=2, max_input_tokens=600, max_new_tokens=400
    ) as scheduler:
        warm = await scheduler.submit(request(0, text=LONG_HISTORY, max_tokens=2))
        await consume(warm)
        assert warm.replica_name == "0"
        # Submitted back to back: none has finished (40 tokens each) before the next is routed.
        streams = [await scheduler.submit(request(i, text=LONG_HISTORY, max_tokens=40)) for i in range(1, 7)]
        assert {s.replica_name for s in streams} == {"0", "1"}
        for stream in streams:
            stream.cancel()
            await consume(stream)


def test_routing_credit_is_at_most_the_requests_own_work():
    from scheduler.affinity import routing_credit

    assert routing_credit({"a": 1500, "b": 0}, prompt_tokens=1520, new_tokens=8) == {"a": 28, "b": 0}
    assert routing_credit({"a": 300}, prompt_tokens=340, new_tokens=400) == {"a": 300}


def test_retry_after_comes_from_the_backlog_and_the_recent_rate():
    scheduler = Scheduler(engine_config("builtin:tiny"))

    class Busy:
        is_ready, remaining_tokens, work_per_s = True, 9000, 300.0

    scheduler.executors = [Busy(), Busy()]
    # 18,000 tokens of work at 600 tokens/s, plus up to a quarter at random, so that refused
    # clients (the openai client waits exactly Retry-After) do not all come back at once.
    values = {scheduler.retry_after_s() for _ in range(200)}
    assert values <= set(range(30, 38)) and len(values) > 1
    Busy.remaining_tokens = 10**9
    assert scheduler.retry_after_s() == 60  # capped
    Busy.work_per_s = 0.0
    assert scheduler.retry_after_s() == 1  # no rate measured yet


async def test_a_multi_prompt_request_is_checked_against_every_replica_queue(tiny_text_path):
    """A completion's prompts go to replicas one by one: their sequences had to fit one replica's
    queue (3 prompts were refused on two replicas holding 2 each), yet a prompt's n choices must."""
    # Each idle replica takes 5: its two free rows and 3 waiting.
    async with running_scheduler(
        tiny_text_path, cpu_replicas=2, max_queue_size=3, max_batch_size=2
    ) as scheduler:
        scheduler.check_room(1, 9)  # 9 of 10 places, 5 + 4
        scheduler.check_room(2, 4)  # two pairs per replica
        with pytest.raises(InvalidRequestError) as pairs:
            # 10 places, but a prompt's pair goes to one replica: two pairs each, ever (it was a
            # 503, and clients that honour Retry-After came back forever).
            scheduler.check_room(2, 5)
        assert pairs.value.param == "prompt" and "at most 4 fit" in pairs.value.message
        with pytest.raises(InvalidRequestError) as too_many:
            scheduler.check_room(1, 11)
        assert too_many.value.param == "prompt" and "at most 10" in too_many.value.message
        # A replica still loading will take its share: until then it is "retry", not a 400.
        scheduler.executors[1].state = "loading"
        with pytest.raises(OverloadedError):
            scheduler.check_room(1, 9)
        scheduler.executors[1].state = "ready"
        with pytest.raises(InvalidRequestError) as wide:
            scheduler.check_room(3, 1)  # the batch, not the queue, is the limit named
        assert wide.value.param == "n" and "at most 2 sequences are batched" in wide.value.message


async def test_a_request_with_a_grammar_runs_on_the_replica_that_compiled_it(tiny_text_path):
    """Admission compiled the grammar on one replica, and the router, asked again at the queue,
    could pick another, which compiled it again inside its step loop while its rows waited."""
    from models.params import GrammarSpec

    async with running_scheduler(
        tiny_text_path, cpu_replicas=2, max_batch_size=1, max_new_tokens=400
    ) as scheduler:
        # Replica 0's one row, held past the compile however slowly a loaded machine runs it.
        busy = await scheduler.submit(request(0, max_tokens=390))
        spec = GrammarSpec("regex", "[a-z]{1,6}", param="guided_regex")
        constrained = request(1, max_tokens=6, grammar=spec)
        async with anyio.create_task_group() as tg:

            async def submit_constrained() -> None:
                streams.append(await scheduler.submit(constrained))

            streams = []
            tg.start_soon(submit_constrained)
            await anyio.sleep(0)
            # A long answer takes replica 1's row while the grammar compiles: replica 0 then has
            # less work left, and the router alone would send the constrained request there.
            streams.append(await scheduler.submit(request(2, max_tokens=390)))
        constrained_stream = streams[0] if streams[0].request is constrained else streams[1]
        assert constrained_stream.replica_name == "1"
        assert spec not in scheduler.executors[0].replica.grammars._compiled
        for stream in (busy, *streams):
            if stream is not constrained_stream:
                stream.cancel()
            await consume(stream)


async def test_a_burst_with_grammars_spreads_over_the_replicas_free_rows(tiny_text_path):
    """Kept on the replica that compiled their grammar, a burst of 8 queued there behind 4 rows
    while the other replica's 4 rows stood free."""
    from models.params import GrammarSpec

    # Never complete (EOS ignored): no answer may end, and free its row, before the burst is routed
    # however slowly a loaded machine prepares the last requests.
    spec = GrammarSpec("regex", "[a-z]+", param="guided_regex")
    async with running_scheduler(
        tiny_text_path, cpu_replicas=2, max_batch_size=4, max_queue_size=8, max_new_tokens=4000
    ) as scheduler:
        streams = []

        async def submit(i: int) -> None:
            streams.append(await scheduler.submit(request(i, max_tokens=4000, grammar=spec)))

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(submit, i)
        assert collections.Counter(s.replica_name for s in streams) == {"0": 4, "1": 4}
        assert not any(s.finished for s in streams)
        for stream in streams:
            stream.cancel()
            await consume(stream)
