"""oneDNN packed linears: packed only for the layer shapes where they were measured faster, with
the same outputs as F.linear."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.cpu_kernels import PackedLinear, pack_linears, packing_supported

pytestmark = pytest.mark.skipif(not packing_supported(), reason="oneDNN unavailable")


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 256, bias=False), nn.Linear(64, 64))


def test_only_shapes_measured_faster_are_packed():
    asked: list[tuple[int, int]] = []

    def pays(linear: nn.Linear, batch_hint: int) -> bool:
        asked.append((linear.in_features, linear.out_features))
        return linear.out_features == 64

    net = model()
    line = pack_linears(net, batch_hint=8, pays=pays)
    assert asked == [(64, 64), (64, 256)]  # each distinct shape measured once
    assert [type(m) for m in net] == [PackedLinear, nn.Linear, PackedLinear]
    assert line.startswith("packed CPU linears: on for 2 of 3 layers")


def test_nothing_packed_when_nothing_pays():
    net = model()
    line = pack_linears(net, pays=lambda linear, batch_hint: False)
    assert all(type(m) is nn.Linear for m in net)
    assert line == "packed CPU linears: off (F.linear measured faster for all 3 layers' shapes)"


def test_packed_outputs_equal_f_linear():
    plain = model()
    packed = model()
    pack_linears(packed, pays=lambda linear, batch_hint: True)
    x = torch.randn(5, 64)
    with torch.inference_mode():
        for a, b in zip(plain, packed, strict=True):
            torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)
