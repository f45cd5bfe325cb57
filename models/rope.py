"""Rotary embeddings whose frequencies depend on the sequence's length, per row of a packed step.

transformers picks such frequencies from the largest position in the forward's input: in a
packed step that is the longest sequence of the batch, so a request's answer would depend on
its neighbours. Two kinds exist:

- LongRoPE (Phi-3/3.5 128k, Phi-3.5-MoE, Phi-4-mini): short factors while a sequence holds at
  most `original_max_position_embeddings` tokens, long ones beyond. When a sequence grows past
  that length during generation, these models drop their cache and compute everything again with
  the long factors. Here each row uses its own sequence's factors, and the batch recomputes a
  sequence that crosses (`scheduler.batch`, `long_rope_after`): the same numbers as `generate()`.
- Dynamic NTK scaling rescales with every new length and keeps keys computed under older scales:
  what a cached key holds depends on the history of the forward calls, which neither chunked
  prefill nor prefix caching can reproduce. Such models take the generic path.
"""

from __future__ import annotations

import inspect
import threading

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

# Model types whose generation drops the cache when a sequence crosses the LongRoPE threshold
# (their `prepare_inputs_for_generation` does it); the recompute is what we reproduce.
_RECOMPUTE_ON_SWITCH = {"phi3", "phimoe", "phi4_multimodal"}
_local = threading.local()


def _rope_types(module) -> list[str]:
    kind = getattr(module, "rope_type", None)
    if isinstance(kind, dict):
        return [str(v) for v in kind.values()]
    return [str(kind)] if kind else []


def rescales_with_length(model) -> bool:
    """Dynamic NTK RoPE: past the original length the frequencies follow the longest sequence
    of the forward, so sequences computed together would rotate by one another's lengths."""
    return any("dynamic" in kind for module in model.modules() for kind in _rope_types(module))


def rope_problem(model) -> str | None:
    """Why the fast path cannot reproduce the model's rotary embedding, or None."""
    if rescales_with_length(model):
        return "dynamic NTK RoPE rescales keys with each forward's length (not reproducible per row)"
    for module in model.modules():
        kinds = _rope_types(module)
        if "longrope" in kinds:
            if isinstance(module.rope_type, dict):
                return "LongRoPE per layer type is not reproduced per row"
            model_type = getattr(model.config, "model_type", "")
            if model_type not in _RECOMPUTE_ON_SWITCH:
                return f"LongRoPE on {model_type} (the switch to long factors is not reproduced)"
    return None


class LongRopeRows:
    """Makes every LongRoPE rotary module of `model` use, per token, the factors of its row's
    sequence while a step's row flags are set (`rows`); outside a step (the self-test's
    reference forward) the module behaves as transformers wrote it."""

    def __init__(self, model) -> None:
        self.modules = [m for m in model.modules() if _rope_types(m) == ["longrope"]]
        self.threshold: int | None = None
        for module in self.modules:
            params = module.config.rope_parameters
            self.threshold = int(params["original_max_position_embeddings"])
            self._install(module)

    def rows(self, long_tokens: torch.Tensor | bool):
        """Context for one forward: `long_tokens` is True/False for the whole step, or a [T]
        bool tensor when short and long rows are mixed."""
        return _RowFlags(long_tokens)

    def _install(self, module) -> None:
        decorated = module.forward
        # transformers' forward without its decorators (no_grad, the length-based update).
        plain = inspect.unwrap(type(module).forward)
        long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](
            module.config, module.inv_freq.device, seq_len=self.threshold + 1
        )
        short_inv_freq = module.original_inv_freq

        def forward(x, position_ids):
            flags = getattr(_local, "flags", None)
            if flags is None:
                return decorated(x, position_ids)
            if isinstance(flags, bool):
                module.inv_freq.copy_(long_inv_freq if flags else short_inv_freq)
                return plain(module, x, position_ids)
            module.inv_freq.copy_(short_inv_freq)
            cos_short, sin_short = plain(module, x, position_ids)
            module.inv_freq.copy_(long_inv_freq)
            cos_long, sin_long = plain(module, x, position_ids)
            pick = flags.view(1, -1, 1)
            return torch.where(pick, cos_long, cos_short), torch.where(pick, sin_long, sin_short)

        module.forward = forward


class _RowFlags:
    def __init__(self, flags) -> None:
        self.flags = flags

    def __enter__(self) -> None:
        _local.flags = self.flags

    def __exit__(self, *exc) -> None:
        _local.flags = None
