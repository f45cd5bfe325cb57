"""The compiled panel kernel for float32 CPU linears: F.linear's answers, each row's result the
same whatever else shares its call, and oneDNN's packed call where it cannot be built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import cpu_kernels, native, panel_linear

needs_kernel = pytest.mark.skipif(not panel_linear.available(), reason="no C compiler or no AVX-512 here")

# Outputs not a multiple of the 16-wide panels, inputs past the 2048-long K block, and row counts
# through every tile shape (1-4 rows; 8-row tiles with each tail of 1-7).
SHAPES = [(1, 1), (7, 15), (64, 17), (600, 40), (2049, 33)]
ROWS = [1, 2, 3, 4, 5, 8, 9, 15, 17, 33]


@needs_kernel
@pytest.mark.parametrize(("in_features", "out_features"), SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_answers_as_f_linear(in_features, out_features, bias):
    torch.manual_seed(in_features)
    layer = nn.Linear(in_features, out_features, bias=bias)
    product = panel_linear.PanelProduct(layer.weight, layer.bias)
    for rows in ROWS:
        x = torch.randn(rows, in_features)
        torch.testing.assert_close(product(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_a_rows_result_does_not_depend_on_its_batch():
    """Bit for bit: greedy outputs must not change with how many requests decode together."""
    torch.manual_seed(0)
    layer = nn.Linear(2100, 40)
    product = panel_linear.PanelProduct(layer.weight, layer.bias)
    x = torch.randn(33, 2100)
    alone = torch.cat([product(x[row : row + 1]) for row in range(33)])
    for rows in ROWS:
        assert torch.equal(product(x[:rows]), alone[:rows]), rows


@needs_kernel
def test_inputs_of_any_layout_and_no_rows():
    torch.manual_seed(1)
    layer = nn.Linear(48, 20)
    product = panel_linear.PanelProduct(layer.weight, layer.bias)
    wide = torch.randn(2, 5, 96)
    strided = wide[..., ::2]  # not contiguous in the last dimension
    sliced = wide[..., :48]  # rows 96 apart
    for x in (strided, sliced, wide[0, :3, 48:]):
        torch.testing.assert_close(product(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    empty = product(torch.randn(0, 48))
    assert empty.shape == (0, 20)


@needs_kernel
def test_other_dtypes_are_refused_not_miscomputed():
    layer = nn.Linear(16, 16)
    product = panel_linear.PanelProduct(layer.weight, layer.bias)
    with pytest.raises(TypeError, match="float32"):
        product(torch.randn(2, 16, dtype=torch.bfloat16))


@needs_kernel
def test_packing_uses_the_kernel_where_it_builds():
    assert cpu_kernels.default_backend() == "panels"
    net = nn.Sequential(nn.Linear(64, 64))
    line = cpu_kernels.pack_linears(net, pays=lambda linear, batch_hint: True)
    assert "compiled panel kernel" in line
    assert isinstance(net[0].compute, panel_linear.PanelProduct)


def test_without_the_kernel_packing_keeps_onednn(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native.library.cache_clear()
    panel_linear.kernel.cache_clear()
    try:
        assert not panel_linear.available()
        assert cpu_kernels.default_backend() == "onednn"
        if cpu_kernels.packing_supported():
            net = nn.Sequential(nn.Linear(64, 64))
            line = cpu_kernels.pack_linears(net, pays=lambda linear, batch_hint: True)
            assert "oneDNN" in line and isinstance(net[0].compute, cpu_kernels.OneDNNProduct)
            x = torch.randn(3, 64)
            with torch.inference_mode():
                torch.testing.assert_close(net[0](x), F.linear(x, net[0].weight, net[0].bias))
    finally:
        native.library.cache_clear()
        panel_linear.kernel.cache_clear()


@needs_kernel
def test_a_layer_the_kernel_gets_wrong_keeps_onednn(monkeypatch, caplog):
    """Once packed, the model's own forward runs the same product, so the replica's self-test could
    not catch a wrong kernel: each layer is checked against F.linear as it is packed."""
    original = panel_linear.PanelProduct.__call__
    monkeypatch.setattr(panel_linear.PanelProduct, "__call__", lambda self, x: original(self, x) * 1.01)
    net = nn.Sequential(nn.Linear(64, 48))
    with caplog.at_level("WARNING", logger="models.cpu_kernels"):
        cpu_kernels.pack_linears(net, pays=lambda linear, batch_hint: True, backend="panels")
    assert isinstance(net[0].compute, cpu_kernels.OneDNNProduct)
    assert "disagrees with F.linear on a 64x48 layer" in caplog.text


def _thp_mode() -> str | None:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return None


def _mapping_of(address: int) -> dict[str, str] | None:
    """The /proc/self/smaps fields of the mapping that holds `address`."""
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            start, end = (int(part, 16) for part in head.split("-"))
            found = {} if start <= address < end else None
        elif found is not None and ":" in line:
            key, value = line.split(":", 1)
            found[key] = value.strip()
            if key == "VmFlags":
                return found
    return None


@needs_kernel
def test_large_panels_hold_the_layout_on_memory_advised_for_huge_pages():
    """Above 2 MiB the panels live on an anonymous mapping advised for transparent huge pages
    (where the kernel offers them): same layout and values as ordinary memory."""
    weight = torch.randn(1000, 1024)  # 4 MB of panels
    panels = panel_linear.to_panels(weight)
    lanes = panels.shape[-1]
    padded = torch.zeros(-(-1000 // lanes) * lanes, 1024)
    padded[:1000] = weight
    assert torch.equal(panels, padded.view(-1, lanes, 1024).transpose(1, 2))
    assert panels.is_contiguous() and panels.data_ptr() % (2 << 20) == 0
    mapping = _mapping_of(panels.data_ptr())
    if _thp_mode() in ("madvise", "always") and mapping is not None:
        assert "hg" in mapping["VmFlags"].split()  # MADV_HUGEPAGE took
        assert "sh" not in mapping["VmFlags"].split()  # private: shared memory takes shmem's switch
        assert mapping.get("THPeligible", "1") == "1"
