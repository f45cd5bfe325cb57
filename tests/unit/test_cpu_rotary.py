"""Rotary embedding through one compiled call on CPU: bit-identical to transformers' functions it
replaces (halves and neighbours, partial rotation where the function does it), and every call it
was not checked for left to the original function."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from transformers.models.cohere import modeling_cohere
from transformers.models.gpt_oss import modeling_gpt_oss
from transformers.models.llama import modeling_llama
from transformers.models.phi3 import modeling_phi3

from models import cpu_rotary
from models.loader import LoadSpec
from models.replica import build_replica
from tests.unit.configs import replica_config

needs_kernel = pytest.mark.skipif(cpu_rotary.kernel() is None, reason="no C compiler here")


def _original(function):
    return function.original if isinstance(function, cpu_rotary.FusedRotary) else function


def _heads(batch=1, heads=4, kv_heads=2, tokens=7, dim=32, rotated=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, tokens, heads, dim, generator=generator).transpose(1, 2)
    k = torch.randn(batch, tokens, kv_heads, dim, generator=generator).transpose(1, 2)
    angles = torch.randn(batch, tokens, rotated or dim, generator=generator)
    return q, k, angles.cos(), angles.sin()


@needs_kernel
@pytest.mark.parametrize(
    ("namespace", "interleaved", "partial"),
    [(modeling_llama, False, False), (modeling_cohere, True, False), (modeling_phi3, False, True)],
)
def test_bit_identical_to_the_function_it_replaces(namespace, interleaved, partial):
    original = _original(namespace.apply_rotary_pos_emb)
    fused = cpu_rotary._replacement(original)
    assert fused is not None and (fused.interleaved, fused.partial) == (interleaved, partial)
    shapes = [dict(), dict(batch=2, tokens=1), dict(tokens=0), dict(dim=64, heads=8, kv_heads=1)]
    if partial:
        shapes.append(dict(rotated=16))
    for shape in shapes:
        q, k, cos, sin = _heads(**shape)
        with torch.inference_mode():
            for want, got in zip(original(q, k, cos, sin), fused(q, k, cos, sin), strict=True):
                assert got.shape == want.shape and torch.equal(got, want), shape


@needs_kernel
@pytest.mark.parametrize(
    ("namespace", "rotated"), [(modeling_llama, None), (modeling_cohere, None), (modeling_phi3, 16)]
)
def test_into_pool_stores_what_the_function_and_two_copies_store(namespace, rotated):
    """Rotated keys and copied values at their pool slots, queries rotated: bit for bit, from the
    strided slices of one q/k/v product as the lean decode step passes them."""
    fused = cpu_rotary._replacement(_original(namespace.apply_rotary_pos_emb))
    tokens, heads, kv_heads, dim, value_dim = 3, 4, 2, 32, 24
    generator = torch.Generator().manual_seed(1)
    qkv = torch.randn(tokens, heads * dim + kv_heads * (dim + value_dim), generator=generator)
    q = qkv[:, : heads * dim].view(1, tokens, heads, dim).transpose(1, 2)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(1, tokens, kv_heads, dim).transpose(1, 2)
    v = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, value_dim)
    angles = torch.randn(1, tokens, rotated or dim, generator=generator)
    cos, sin = angles.cos(), angles.sin()
    slots = torch.tensor([9, 2, 30])
    pools = [torch.zeros(4, 8, kv_heads, width) for width in (dim, value_dim, dim, value_dim)]
    with torch.inference_mode():
        want_q, want_k = fused.original(q, k, cos, sin)
        pools[0].view(-1, kv_heads, dim).index_copy_(0, slots, want_k[0].transpose(0, 1))
        pools[1].view(-1, kv_heads, value_dim).index_copy_(0, slots, v)
        got_q = fused.into_pool(q, k, v, cos, sin, pools[2], pools[3], slots)
        assert torch.equal(got_q, want_q)
        assert torch.equal(pools[2], pools[0]) and torch.equal(pools[3], pools[1])
        # Calls it does not take: another dtype of slots, a batch of two sequences.
        assert fused.into_pool(q, k, v, cos, sin, pools[2], pools[3], slots.int()) is None
        two = torch.cat([q, q]), torch.cat([k, k]), torch.cat([cos, cos]), torch.cat([sin, sin])
        assert fused.into_pool(two[0], two[1], v, two[2], two[3], pools[2], pools[3], slots) is None


@needs_kernel
def test_other_calls_go_to_the_original_function():
    calls = []

    def original(q, k, cos, sin, unsqueeze_dim=1):
        calls.append(unsqueeze_dim)
        return _original(modeling_llama.apply_rotary_pos_emb)(q, k, cos, sin, unsqueeze_dim)

    fused = cpu_rotary.FusedRotary(original, interleaved=False, partial=False)
    q, k, cos, sin = _heads()
    with torch.inference_mode():
        fused(q, k, cos, sin)
        fused(q, k, cos, sin, 1)
        assert calls == []  # both taken by the kernel
        fused(q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=2)  # heads second-to-last
        fused(q.double(), k.double(), cos.double(), sin.double())
        q16, k16, cos16, sin16 = _heads(rotated=16)
        with pytest.raises(RuntimeError):  # Llama's function does not rotate part of the features
            fused(q16, k16, cos16, sin16)
    assert calls == [2, 1, 1]


@needs_kernel
def test_functions_it_does_not_reproduce_are_left_alone():
    assert cpu_rotary._replacement(_original(modeling_gpt_oss.apply_rotary_pos_emb)) is None
    assert cpu_rotary._replacement(lambda q, k, cos, sin: (q, k)) is None
    assert cpu_rotary._replacement(lambda q, k: (q, k)) is None  # another signature


@needs_kernel
def test_installed_once_per_modeling_module_and_kept(monkeypatch):
    namespace = types.ModuleType("fake_modeling")
    namespace.apply_rotary_pos_emb = _original(modeling_llama.apply_rotary_pos_emb)
    layer_class = type("FakeAttention", (torch.nn.Module,), {"__module__": "fake_modeling"})
    monkeypatch.setitem(sys.modules, "fake_modeling", namespace)
    model = torch.nn.Sequential(layer_class(), layer_class())
    assert cpu_rotary.fuse_rotary(model) == "fused CPU rotary embedding: on (fake_modeling)"
    installed = namespace.apply_rotary_pos_emb
    assert isinstance(installed, cpu_rotary.FusedRotary)
    assert cpu_rotary.fuse_rotary(model) == "fused CPU rotary embedding: on (fake_modeling)"
    assert namespace.apply_rotary_pos_emb is installed  # not wrapped twice


def test_without_the_kernel_nothing_changes(monkeypatch):
    monkeypatch.setattr(cpu_rotary, "kernel", lambda: None)
    before = modeling_llama.apply_rotary_pos_emb
    assert (
        cpu_rotary.fuse_rotary(torch.nn.Linear(2, 2))
        == "fused CPU rotary embedding: off (kernel not built here)"
    )
    assert modeling_llama.apply_rotary_pos_emb is before


@needs_kernel
def test_a_cpu_replica_gets_it():
    replica = build_replica(
        LoadSpec(source="builtin:tiny", dtype="fp32", attn_impl="sdpa"), replica_config(max_batch_size=2)
    )
    module = sys.modules[type(replica.loaded.model.model.layers[0].self_attn).__module__]
    assert isinstance(module.apply_rotary_pos_emb, cpu_rotary.FusedRotary)
