"""The dtype and the attention implementations a load may use on a device, decided before
loading anything (the loader tries them in order; the entrypoint refuses ATTN_STRICT settings
that cannot work)."""

from __future__ import annotations

import importlib.util

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ATTN_IMPLS = ("flash_attention_2", "sdpa", "eager")


def pick_dtype(requested: torch.dtype, device: torch.device) -> tuple[torch.dtype, str]:
    name = DTYPE_NAMES[requested]
    if device.type == "cpu":
        if requested == torch.float32:
            return requested, "requested"
        return torch.float32, f"{name} requested; forced on CPU"
    if requested == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] < 8:
        return torch.float16, "bf16 requested; GPU has no bf16 support"
    return requested, "requested"


def strict_attention_problem(impl: str, device: str, dtype: str) -> str | None:
    """Why `impl` cannot load on `device` ("cpu", "cuda:0") at `dtype` ("bf16"...), known before
    loading anything (the entrypoint fails startup on it under ATTN_STRICT); None when only
    loading the model can tell."""
    where = torch.device(device)
    picked, _ = pick_dtype(DTYPES[dtype], where)
    return attention_unavailable(impl, where, picked)


def attention_unavailable(impl: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `impl` cannot work here before even trying, or None; model support is checked by loading."""
    if impl != "flash_attention_2":
        return None
    if device.type != "cuda":
        return "needs a CUDA device"
    if dtype not in (torch.float16, torch.bfloat16):
        return "needs fp16 or bf16"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash_attn not installed"
    return None
