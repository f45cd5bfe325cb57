"""Which devices replicas run on, and the per-thread device/stream scope each replica enters."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator, Sequence

import torch


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_devices(
    *,
    device: str = "auto",
    gpu_ids: Sequence[int] | None = None,
    gpu_count: int | None = None,
    cpu_replicas: int = 1,
) -> list[str]:
    """`GPU_IDS` beats `GPU_COUNT`; with no usable GPU (or `DEVICE=cpu`) run `cpu_replicas` CPU replicas.

    Raises ValueError for a GPU selection the machine cannot satisfy, so startup fails clearly
    instead of silently running on fewer devices than asked.
    """
    visible = cuda_device_count()
    if device == "cpu":
        return ["cpu"] * max(1, cpu_replicas)
    if device == "auto" and visible == 0:
        # Asking for GPUs and getting CPU, with fp32 and a fraction of the speed, is not a
        # fallback anyone wants to discover from their latency graphs.
        if gpu_ids:
            raise ValueError(
                "GPU_IDS asks for GPUs but no CUDA device is visible; set DEVICE=cpu to serve on CPU"
            )
        if gpu_count:
            raise ValueError(
                f"GPU_COUNT={gpu_count} asks for GPUs but no CUDA device is visible; set DEVICE=cpu to serve on CPU"
            )
        return ["cpu"] * max(1, cpu_replicas)
    if visible == 0:
        raise ValueError("DEVICE=cuda but no CUDA device is visible")
    if gpu_ids:
        missing = [i for i in gpu_ids if i >= visible]
        if missing:
            raise ValueError(f"GPU_IDS names device(s) {missing} but only {visible} are visible")
        return [f"cuda:{i}" for i in gpu_ids]
    count = gpu_count or 1
    if count > visible:
        raise ValueError(f"GPU_COUNT={count} but only {visible} CUDA device(s) are visible")
    return [f"cuda:{i}" for i in range(count)]


class DeviceScope:
    """Enters the replica's CUDA device and its own stream; a no-op on CPU.

    Entered around every unit of work in the replica's thread, never process-wide, so replicas on
    different GPUs never share a current device or stream.
    """

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self._stream = None
        if self.device.type == "cuda":
            self._stream = torch.cuda.Stream(device=self.device)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if self._stream is None:
            yield
            return
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            yield


def set_cpu_threads(num_replicas: int) -> None:
    """Share the cores between CPU replicas instead of letting each claim all of them."""
    import os

    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // max(1, num_replicas)))


def kv_cache_budget(device: torch.device, *, gpu_fraction: float = 0.9) -> int:
    """Bytes the KV pool may take on `device` when not configured, measured after the model is
    loaded: a share of the free GPU memory (the rest is for activations), or a quarter of the
    available RAM on CPU (the pool is committed at startup; tokenizers, images and other replicas
    need the rest)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * gpu_fraction)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    return 4 << 30


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def trim_host_memory() -> None:
    """Hand freed heap pages back to the OS. glibc keeps what a long prompt's transient buffers
    used in its arenas; measured on the bench model, a 4,000-token prompt left the process
    123 MiB larger until this ran (docs/BENCHMARKS.md)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
