"""bench.host's in-process workload: the served (a) workload's shape through the real executor."""

from __future__ import annotations

import pytest

from bench.host import engine_workload
from models.loader import LoadSpec
from models.replica import build_replica
from tests.unit.configs import replica_config


@pytest.fixture(scope="module")
def replica(tiny_text_path):
    return build_replica(
        LoadSpec(source=str(tiny_text_path), dtype="fp32", attn_impl="sdpa"), replica_config(max_batch_size=4)
    )


def test_engine_workload_answers_every_request_within_its_concurrency(replica, tiny_text_path):
    row = engine_workload(
        replica, str(tiny_text_path), requests=7, concurrency=3, prompt_tokens=6, max_tokens=4
    )
    assert row["requests"] == 7
    assert row["max_in_flight"] == 3  # never more in flight than the load generator would send
    assert row["completion_tokens"] == 7 * 4  # ignore_eos: every request ran to max_tokens
    # Requests join as others finish: at least three waves of at least four decode steps each.
    assert row["steps"] >= 3 * 4
    assert row["completion_tok_s"] > 0
    assert row["prompt_tokens_mean"] > 6  # the chat template's own tokens come on top of the user turn


def test_linears_reports_each_kernel_per_call_with_consistent_rates():
    from bench.linears import measure
    from models import panel_linear

    row = measure(64, 32, batch=2, calls=3, bytes_cycled=1 << 16)  # 8 distinct weights of 8 KiB
    assert (row["shape"], row["batch"]) == ("64x32", 2)
    kernels = ("f_linear", "packed") + (("panels",) if panel_linear.available() else ())
    assert ("panels_us" in row) == panel_linear.available()
    for kernel in kernels:
        us = row[f"{kernel}_us"]
        assert us > 0
        # Rounded to 0.1: the rates follow from the time, the weight bytes and the FLOPs.
        assert abs(row[f"{kernel}_gb_s"] - 64 * 32 * 4 / us / 1e3) <= 0.051 + 0.01 * row[f"{kernel}_gb_s"]
        assert (
            abs(row[f"{kernel}_gflop_s"] - 2 * 64 * 32 * 2 / us / 1e3)
            <= 0.051 + 0.01 * row[f"{kernel}_gflop_s"]
        )


def test_lean_step_is_the_models_own_decode_step(tiny_text_path):
    """bench.lean_step compares the engine with a hand-written step: it must compute what the model
    computes, or the comparison says nothing."""
    import torch
    from transformers import AutoModelForCausalLM

    from bench.lean_step import LeanLlamaStep, rotary

    model = AutoModelForCausalLM.from_pretrained(str(tiny_text_path), dtype=torch.float32).eval()
    step = LeanLlamaStep(model)
    prompts = torch.tensor([[5, 9, 13, 17, 21, 25], [7, 3, 11, 2, 30, 8]])
    with torch.no_grad():
        out = model(prompts, use_cache=True)
        layers = out.past_key_values.layers[: model.config.num_hidden_layers]
        keys = torch.stack([layer.keys for layer in layers])  # copies: the next call extends the cache
        values = torch.stack([layer.values for layer in layers])
        following = torch.tensor([[40], [41]])
        expected = model(following, past_key_values=out.past_key_values).logits[:, -1]
        cos, sin = rotary(step, torch.tensor([6, 6]))
        mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
        got = step(following[:, 0], cos, sin, keys, values, mask)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_step_split_times_each_part_of_the_same_decode_steps_and_unwraps(replica):
    from torch import nn

    import models.attention as attention
    from bench.step_split import split

    forward, decode_attention = nn.Linear.forward, attention.decode_attention
    in_place, replica.runner.in_place_decode = replica.runner.in_place_decode, False
    try:
        row = split(replica, batch=2, steps=3)
    finally:
        replica.runner.in_place_decode = in_place
    assert row["batch"] == 2
    assert 0 < row["linears_ms"] < row["forward_ms"]
    assert 0 < row["of_which_kv_gather_ms"] < row["decode_attention_ms"] < row["forward_ms"]
    # The parts lie inside the counted decode steps' forward (prefill steps left out): some is left.
    assert row["rest_ms"] > 0
    if replica.runner.in_place_decode:
        # The compiled kernel reads the pool in place: attention without any gather.
        row = split(replica, batch=2, steps=3)
        assert row["of_which_kv_gather_ms"] == 0 < row["decode_attention_ms"] < row["forward_ms"]
    assert nn.Linear.forward is forward and attention.decode_attention is decode_attention


def test_decode_steps_enters_around_for_exactly_the_timed_steps(replica):
    import contextlib

    import models.attention as attention
    from bench.host import _decode_steps

    calls = []

    @contextlib.contextmanager
    def counting():
        original = attention.decode_attention
        attention.decode_attention = lambda *a, **k: calls.append(1) or original(*a, **k)
        try:
            yield
        finally:
            attention.decode_attention = original

    _decode_steps(replica, 2, 3, around=counting())
    # One decode-attention call per layer per step: neither the prefill nor the drain after.
    assert len(calls) == 3 * replica.loaded.model.config.num_hidden_layers


def test_compare_fusions_times_both_forms_and_leaves_the_compiled_ones_in_place(monkeypatch):
    import sys

    import bench.host as host
    from models import cpu_norms, cpu_rotary

    if cpu_norms.kernel() is None or cpu_rotary.kernel() is None:
        pytest.skip("no C compiler here")
    written = {}
    monkeypatch.setattr(host, "write_results", lambda name, rows: written.setdefault(name, rows))
    host.main(["--compare-fusions", "1", "--batches", "1", "--steps", "2"])
    rows = written["host-fusions"]
    assert [row["mode"] for row in rows] == ["torch-ops", "fused"]
    assert all(row["median_ms"] > 0 and row["norms_fused"] > 0 and row["rotary_fused"] for row in rows)
    namespace = sys.modules[rows[0]["rotary_fused"][0]]
    assert isinstance(
        namespace.apply_rotary_pos_emb, cpu_rotary.FusedRotary
    )  # restored after the torch rounds


def test_compare_lean_times_both_steps_and_leaves_the_lean_one_in_place(monkeypatch):
    import bench.host as host
    import models.replica as replica_module

    built = []
    build = replica_module.build_replica
    monkeypatch.setattr(host, "build_replica", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    written = {}
    monkeypatch.setattr(host, "write_results", lambda name, rows: written.setdefault(name, rows))
    host.main(["--compare-lean", "1", "--batches", "1", "--steps", "2"])
    rows = written["host-lean"]
    assert [row["mode"] for row in rows] == ["modules", "lean"]
    assert all(row["median_ms"] > 0 for row in rows)
    assert built[0].runner.lean is not None
