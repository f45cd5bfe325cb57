"""RMSNorm through one compiled call on CPU: installed only where it answers as the module's own
forward (Llama's and Gemma's forms), each row's result independent of its batch, everything else
(LayerNorms, gated calls, other dtypes, no compiler) left to the module."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from models import cpu_norms
from models.loader import LoadSpec
from models.replica import build_replica
from tests.unit.configs import replica_config

needs_kernel = pytest.mark.skipif(cpu_norms.kernel() is None, reason="no C compiler here")


def _randomised(module: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        module.weight.normal_(0.0, 0.5)  # neither all ones nor all zeros: Llama's and Gemma's forms differ
    return module


class GatedRMSNorm(LlamaRMSNorm):
    """Qwen3-Next's shape: a plain RMSNorm unless a gate is passed."""

    def forward(self, hidden_states, gate=None):
        out = super().forward(hidden_states)
        return out if gate is None else out * nn.functional.silu(gate)


class MeanSquareOutsideRoot(LlamaRMSNorm):
    """eps added after the square root: answers like an RMSNorm except where mean(x^2) ~ eps."""

    def forward(self, hidden_states):
        return (
            self.weight
            * hidden_states
            / (hidden_states.pow(2).mean(-1, keepdim=True).sqrt() + self.variance_epsilon)
        )


@needs_kernel
@pytest.mark.parametrize("dim", [1, 15, 16, 17, 64, 768, 2051])
@pytest.mark.parametrize("norm_class", [LlamaRMSNorm, GemmaRMSNorm])
def test_answers_as_the_modules_own_forward(norm_class, dim):
    norm = _randomised(norm_class(dim, eps=1e-6), dim)
    x = torch.randn(2, 3, dim) * torch.tensor([1e-4, 1.0, 300.0]).view(1, 3, 1)
    with torch.inference_mode():
        expected = norm(x)
        assert cpu_norms.fuse_rms_norms(norm).startswith("fused CPU RMSNorm: on for 1 of 1")
        torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_head_norms_over_strided_views():
    """Qwen3's query norm sees [batch, tokens, heads, head_dim] views; rows of any layout."""
    norm = _randomised(LlamaRMSNorm(16), 3)
    wide = torch.randn(2, 5, 4, 32)
    with torch.inference_mode():
        expected = [norm(x) for x in (wide[..., :16], wide[..., ::2], wide.transpose(1, 2)[..., 16:])]
        cpu_norms.fuse_rms_norms(norm)
        for x, want in zip(
            (wide[..., :16], wide[..., ::2], wide.transpose(1, 2)[..., 16:]), expected, strict=True
        ):
            got = norm(x)
            assert got.shape == x.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert norm(torch.randn(0, 16)).shape == (0, 16)


@needs_kernel
def test_a_rows_result_does_not_depend_on_its_batch():
    """Bit for bit, below and above the row count where the rows split over threads."""
    norm = _randomised(LlamaRMSNorm(768), 4)
    cpu_norms.fuse_rms_norms(norm)
    x = torch.randn(130, 768)
    with torch.inference_mode():
        alone = torch.cat([norm(x[row : row + 1]) for row in range(130)])
        for rows in (1, 2, 7, 63, 64, 65, 130):
            assert torch.equal(norm(x[:rows]), alone[:rows]), rows


@needs_kernel
def test_what_it_does_not_reproduce_keeps_its_own_forward():
    model = nn.ModuleDict(
        {
            "layer_norm": nn.LayerNorm(32),
            "outside_root": _randomised(MeanSquareOutsideRoot(32), 5),
            "gated": _randomised(GatedRMSNorm(32), 6),
            "in_bf16": LlamaRMSNorm(32).to(torch.bfloat16),
        }
    )
    with torch.no_grad():
        model["layer_norm"].weight.normal_()
    decision = cpu_norms.fuse_rms_norms(model)
    # The gated norm answers as an RMSNorm without its gate, so it is fused; the bf16 one is no candidate.
    assert decision == "fused CPU RMSNorm: on for 1 of 3 normalisation layers"
    assert "forward" not in vars(model["layer_norm"]) and "forward" not in vars(model["outside_root"])
    assert "forward" in vars(model["gated"])
    x, gate = torch.randn(3, 32), torch.randn(3, 32)
    with torch.inference_mode():
        reference = GatedRMSNorm(32)
        reference.load_state_dict(model["gated"].state_dict())
        # With a gate, the module's own forward runs; so it does for an input of another dtype.
        torch.testing.assert_close(model["gated"](x, gate), reference(x, gate))
        torch.testing.assert_close(model["gated"](x, gate=gate), reference(x, gate=gate))
        torch.testing.assert_close(
            model["gated"](x.double()), GatedRMSNorm.forward(model["gated"], x.double()), rtol=0, atol=0
        )


def test_without_the_kernel_nothing_changes(monkeypatch):
    monkeypatch.setattr(cpu_norms, "kernel", lambda: None)
    norm = LlamaRMSNorm(32)
    assert cpu_norms.fuse_rms_norms(norm) == "fused CPU RMSNorm: off (kernel not built here)"
    assert "forward" not in vars(norm)


@needs_kernel
@pytest.mark.parametrize("packed", [True, False])
def test_replicas_fuse_only_with_the_cpu_kernels_on(packed):
    replica = build_replica(
        LoadSpec(source="builtin:tiny", dtype="fp32", attn_impl="sdpa"),
        replica_config(max_batch_size=2, pack_cpu_linears=packed),
    )
    norms = [m for m in replica.loaded.model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms
    assert all(("forward" in vars(m)) is packed for m in norms)
