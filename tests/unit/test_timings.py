"""Step timings: where a replica's steps spend their time, as /health shows it and bench.host reads it."""

from __future__ import annotations

import time

import pytest

from models.loader import LoadSpec
from models.params import SamplingParams
from models.prompt import PreparedPrompt
from models.replica import build_replica
from scheduler.timings import StepTimings
from tests.unit.configs import replica_config
from tests.unit.engine_driver import EngineDriver


def test_totals_per_step_and_the_smoothed_recent_figures():
    timings = StepTimings()
    timings.add(rows=2, schedule=0.001, execute=0.010)
    timings.add(rows=4, schedule=0.003, execute=0.030)
    per_step = timings.per_step()
    assert per_step["schedule"] == pytest.approx(2.0) and per_step["execute"] == pytest.approx(20.0)
    assert per_step["rows"] == 3
    recent = timings.recent()
    assert 10.0 < recent["execute"] < 30.0  # smoothed: between the two steps, nearer the first
    timings.reset()
    assert timings.per_step() == {"rows": 0.0}
    assert timings.recent() == recent  # /health keeps showing the recent steps


@pytest.fixture(scope="module")
def replica(tiny_text_path):
    return build_replica(
        LoadSpec(source=str(tiny_text_path), dtype="fp32", attn_impl="sdpa"), replica_config(max_batch_size=4)
    )


def test_the_executor_times_every_phase_of_its_steps(replica):
    driver = EngineDriver(replica)
    stream = driver.submit(PreparedPrompt([5, 6, 7, 8]), SamplingParams(max_tokens=5, temperature=0.0))
    driver.run([stream])
    timings = driver.executor.timings
    assert timings.steps == 5  # one prefill step that samples, four decode steps
    figures = driver.executor.stats()["step_ms"]
    assert set(figures) == {"schedule", "execute", "forward", "sample", "postprocess", "emit", "handoff"}
    assert all(value >= 0 for value in figures.values())
    assert figures["forward"] > 0 and figures["execute"] >= figures["forward"]
    assert figures["emit"] >= figures["handoff"]


class _SlowHandoff(EngineDriver):
    """A receiver that keeps the replica thread 4 ms per hand-off, as a busy event loop holding
    the GIL does."""

    def _deliver(self, items) -> None:
        time.sleep(0.004)
        super()._deliver(items)


def test_the_handoff_is_timed_apart_from_the_rest_of_emit(replica):
    driver = _SlowHandoff(replica)
    stream = driver.submit(PreparedPrompt([5, 6, 7, 8]), SamplingParams(max_tokens=3, temperature=0.0))
    driver.run([stream])
    per_step = driver.executor.timings.per_step()
    assert per_step["handoff"] >= 4.0
    assert per_step["emit"] >= per_step["handoff"]
