"""oneDNN packed linears: only layers large enough to gain are packed, with the same outputs as
F.linear."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.cpu_kernels import PACK_MIN_WEIGHTS, PackedLinear, pack_linears, packing_pays, packing_supported

pytestmark = pytest.mark.skipif(not packing_supported(), reason="oneDNN unavailable")


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 256, bias=False), nn.Linear(64, 64))


def test_only_layers_the_rule_approves_are_packed():
    net = model()
    line = pack_linears(net, batch_hint=8, pays=lambda linear, batch_hint: linear.out_features == 64)
    assert [type(m) for m in net] == [PackedLinear, nn.Linear, PackedLinear]
    assert line.startswith("packed CPU linears: on for 2 of 3 layers")


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


def test_packed_outputs_equal_f_linear():
    plain = model()
    packed = model()
    pack_linears(packed, pays=lambda linear, batch_hint: True)
    x = torch.randn(5, 64)
    with torch.inference_mode():
        for a, b in zip(plain, packed, strict=True):
            torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)
