"""Packed linears: only layers large enough to gain are packed, with the same outputs as F.linear,
through each backend this machine has (oneDNN's packed call, the compiled panel kernel)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import panel_linear
from models.cpu_kernels import (
    PACK_MIN_WEIGHTS,
    PackedLinear,
    SharedInputs,
    SharedProductMember,
    pack_linears,
    packing_pays,
    packing_supported,
)

pytestmark = pytest.mark.skipif(not packing_supported(), reason="oneDNN unavailable")

BACKENDS = ["onednn"] + (["panels"] if panel_linear.available() else [])


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 256, bias=False), nn.Linear(64, 64))


def test_only_layers_the_rule_approves_are_packed():
    net = model()
    line = pack_linears(net, batch_hint=8, pays=lambda linear, batch_hint: linear.out_features == 64)
    assert [type(m) for m in net] == [PackedLinear, nn.Linear, PackedLinear]
    assert line.startswith("packed CPU linears (") and "on for 2 of 3 layers" in line


def test_small_layers_stay_f_linear_and_large_ones_are_packed():
    """builtin:tiny's 64-wide layers gain nothing from packing; the bench model's 768-wide do."""
    assert not packing_pays(nn.Linear(64, 64), 16)
    assert not packing_pays(nn.Linear(256, 256), 16)
    assert packing_pays(nn.Linear(768, 256), 16) and packing_pays(nn.Linear(768, 2048), 16)
    assert PACK_MIN_WEIGHTS == 2**17


def test_nothing_packed_when_nothing_pays():
    net = model()
    line = pack_linears(net, pays=lambda linear, batch_hint: False)
    assert all(type(m) is nn.Linear for m in net)
    assert line == "packed CPU linears: off (none of the 3 layers is large enough to gain)"


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_outputs_equal_f_linear(backend):
    plain = model()
    packed = model()
    pack_linears(packed, pays=lambda linear, batch_hint: True, backend=backend)
    x = torch.randn(5, 64)
    with torch.inference_mode():
        for a, b in zip(plain, packed, strict=True):
            torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)


class Attention(nn.Module):
    """q, k and v read the same input; o reads another (as in every attention layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(32, 32)
        self.k = nn.Linear(32, 16)
        self.v = nn.Linear(32, 16)
        self.o = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x).view(*x.shape[:-1], 4, 8)
        kv = torch.cat([self.k(x), self.v(x)], dim=-1).view(*x.shape[:-1], 4, 8)
        return self.o((q * kv).flatten(-2))


def shared_attention() -> tuple[nn.Module, nn.Module, list[list[str]]]:
    torch.manual_seed(0)
    plain = Attention()
    fused = Attention()
    fused.load_state_dict(plain.state_dict())
    with SharedInputs(fused) as shared, torch.inference_mode():
        fused(torch.randn(3, 32))
        fused(torch.randn(2, 5, 32))
    return plain, fused, shared.groups()


@pytest.mark.parametrize("backend", BACKENDS)
def test_siblings_fed_the_same_tensor_run_as_one_product(backend):
    plain, fused, groups = shared_attention()
    assert groups == [["q", "k", "v"]]  # o reads the attention output, not x
    line = pack_linears(fused, pays=lambda linear, batch_hint: True, shared=groups, backend=backend)
    assert "1 groups of siblings" in line
    assert [type(m) for m in (fused.q, fused.k, fused.v, fused.o)] == [
        SharedProductMember,
        SharedProductMember,
        SharedProductMember,
        PackedLinear,
    ]
    assert fused.q.product is fused.k.product is fused.v.product
    with torch.inference_mode():
        for x in (torch.randn(1, 32), torch.randn(7, 32), torch.randn(1, 4, 32)):
            torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)
        assert fused.q.product._input is None  # every slice taken: no activation kept alive


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_member_called_on_another_tensor_computes_its_own_answer(backend):
    plain, fused, groups = shared_attention()
    pack_linears(fused, pays=lambda linear, batch_hint: True, shared=groups, backend=backend)
    x, other = torch.randn(4, 32), torch.randn(4, 32)
    with torch.inference_mode():
        torch.testing.assert_close(fused.q(x), plain.q(x), rtol=1e-5, atol=1e-5)
        # k on a different tensor than the product was computed from; then q again, already taken.
        torch.testing.assert_close(fused.k(other), plain.k(other), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused.q(other), plain.q(other), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused.q(other), plain.q(other), rtol=1e-5, atol=1e-5)
        out = fused.v(x.unsqueeze(0).expand(2, 4, 32))
        assert out.is_contiguous()
        torch.testing.assert_close(out, plain.v(x).expand(2, 4, 16), rtol=1e-5, atol=1e-5)


def test_whether_a_group_pays_is_judged_on_its_combined_layer():
    _, fused, groups = shared_attention()
    line = pack_linears(fused, pays=lambda linear, batch_hint: linear.out_features > 100, shared=groups)
    assert all(type(m) is nn.Linear for m in (fused.q, fused.k, fused.v, fused.o))
    assert line.startswith("packed CPU linears: off")
    # q, k and v (32, 16 and 16 outputs) would not pay alone; together (64) they do.
    pack_linears(fused, pays=lambda linear, batch_hint: linear.out_features > 50, shared=groups)
    assert [type(m) for m in (fused.q, fused.k, fused.v, fused.o)] == [SharedProductMember] * 3 + [nn.Linear]


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_with_every_layer_packed_and_grouped_answers_as_the_unpacked_model(
    tiny_text_path, monkeypatch, backend
):
    """builtin:tiny's layers are too small for the size rule: pack them all so that the engine's
    own grouping (recorded during its self-test) runs, batched, against generate() unpacked."""
    import models.replica as replica_module
    from models.loader import LoadSpec
    from models.params import SamplingParams
    from models.prompt import PreparedPrompt
    from tests.unit.configs import replica_config
    from tests.unit.engine_driver import hf_greedy, run_jobs

    def pack_everything(model, *, batch_hint, shared):
        return pack_linears(
            model, batch_hint=batch_hint, pays=lambda linear, hint: True, shared=shared, backend=backend
        )

    spec = LoadSpec(source=str(tiny_text_path), dtype="fp32", attn_impl="sdpa")
    plain = replica_module.build_replica(spec, replica_config(max_batch_size=4, pack_cpu_linears=False))
    monkeypatch.setattr(replica_module, "pack_linears", pack_everything)
    packed = replica_module.build_replica(spec, replica_config(max_batch_size=4, pack_cpu_linears=True))
    members = [m for m in packed.loaded.model.modules() if isinstance(m, SharedProductMember)]
    assert packed.path == "fast" and members, "no sibling group was found in a Llama's layers"
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    texts = ("Hello there, how are you today?", "A longer prompt " * 9, "Hi")
    prompts = [PreparedPrompt(packed.loaded.tokenizer(text)["input_ids"]) for text in texts]
    outputs = run_jobs(
        packed, [(step, prompt, params) for step, prompt in zip((0, 1, 3), prompts, strict=True)]
    )
    assert outputs == [hf_greedy(plain, prompt, 12) for prompt in prompts]


class Chain(nn.Module):
    """fc1's input is a temporary freed before fc2's is made: CPython hands fc2's its id."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(x))))


def test_layers_fed_one_after_the_other_are_not_siblings_even_when_an_id_is_reused():
    chain = Chain()
    seen: list[int] = []
    for layer in (chain.fc1, chain.fc2):
        layer.register_forward_pre_hook(lambda module, args: seen.append(id(args[0])))
    with SharedInputs(chain) as shared, torch.inference_mode():
        chain(torch.randn(2, 32))
    if seen[0] != seen[1]:
        pytest.skip("the interpreter did not reuse the freed input's id this time")
    assert shared.groups() == []
