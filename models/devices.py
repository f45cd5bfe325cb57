"""Which devices replicas run on, and the per-thread device/stream scope each replica enters."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# A replica spread over several GPUs is named by its devices joined with this: "cuda:0+cuda:1".
PLACEMENT_SEPARATOR = "+"


def placement_devices(placement: str) -> list[str]:
    """The devices of a replica's placement, the first being where its inputs and outputs live."""
    return placement.split(PLACEMENT_SEPARATOR)


def group_placements(devices: Sequence[str], gpus_per_replica: int) -> list[str]:
    """Consecutive runs of `gpus_per_replica` selected GPUs, one replica each."""
    if gpus_per_replica <= 1 or all(d == "cpu" for d in devices):
        return list(devices)
    if len(devices) % gpus_per_replica:
        raise ValueError(
            f"GPUS_PER_REPLICA={gpus_per_replica} does not divide the {len(devices)} selected GPU(s) "
            f"({', '.join(devices)}): select a multiple of it with GPU_IDS or GPU_COUNT"
        )
    return [
        PLACEMENT_SEPARATOR.join(devices[i : i + gpus_per_replica])
        for i in range(0, len(devices), gpus_per_replica)
    ]


def resolve_devices(
    *,
    device: str = "auto",
    gpu_ids: Sequence[int] | None = None,
    gpu_count: int | None = None,
    cpu_replicas: int = 1,
    gpus_per_replica: int = 1,
) -> list[str]:
    """One placement per replica: `GPU_IDS` beats `GPU_COUNT`, and `gpus_per_replica` GPUs make one
    replica; with no usable GPU (or `DEVICE=cpu`) run `cpu_replicas` CPU replicas.

    Raises ValueError for a GPU selection the machine cannot satisfy, so startup fails clearly
    instead of silently running on fewer devices than asked.
    """
    selected = _select_devices(device, gpu_ids, gpu_count, cpu_replicas, gpus_per_replica)
    return group_placements(selected, gpus_per_replica)


def _select_devices(
    device: str,
    gpu_ids: Sequence[int] | None,
    gpu_count: int | None,
    cpu_replicas: int,
    gpus_per_replica: int,
) -> list[str]:
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
    # Without a count, one replica's worth: the model is as large as GPUS_PER_REPLICA says.
    count = gpu_count or gpus_per_replica
    if count > visible:
        raise ValueError(f"GPU_COUNT={count} but only {visible} CUDA device(s) are visible")
    return [f"cuda:{i}" for i in range(count)]


class DeviceScope:
    """Enters the replica's CUDA device and its own stream; a no-op on CPU.

    Entered around every unit of work in the replica's thread, never process-wide, so replicas on
    different GPUs never share a current device or stream.
    """

    def __init__(self, device: str) -> None:
        # A replica over several GPUs runs from its first: the other GPUs' layers run on their
        # own current streams, and copies between them follow the streams' order.
        self.device = torch.device(placement_devices(device)[0])
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


def set_cpu_threads(num_replicas: int) -> int:
    """Share the cores between CPU replicas instead of letting each claim all of them; the
    threads each replica's kernels use, which it returns."""
    threads = cpu_threads_per_replica(num_replicas)
    torch.set_num_threads(threads)
    return threads


def cpu_threads_per_replica(num_replicas: int, environ: Mapping[str, str] | None = None) -> int:
    """An explicit OMP_NUM_THREADS (a team's size, so per replica), else the usable cores split
    between the replicas. os.cpu_count() counted the node's cores, not the pod's: under a
    Kubernetes CPU limit of 4 on a 64-core node each replica ran 64 threads, and an operator's
    OMP_NUM_THREADS was overwritten."""
    explicit = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "")
    outermost = explicit.split(",")[0].strip()  # "4,2": nested levels, the first is the team's
    if outermost.isascii() and outermost.isdecimal() and int(outermost) > 0:
        return int(outermost)
    return max(1, usable_cores() // max(1, num_replicas))


def usable_cores(cgroup_root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> int:
    """The CPUs this process may run on (its affinity mask), capped by the CPU quota of its cgroup
    and the cgroups above it (what a Kubernetes CPU limit or a systemd CPUQuota sets), rounded
    down: threads beyond the quota are throttled together."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quotas = [
        q for folder in _cgroup_cpu_folders(Path(cgroup_root), proc_cgroup) if (q := _cpu_quota(folder))
    ]
    if quotas:
        cores = min(cores, int(min(quotas)))
    return max(1, cores)


def _cgroup_cpu_folders(root: Path, proc_cgroup: str) -> list[Path]:
    """The folders of this process's CPU cgroup and of those above it, up to the mount: the
    paths /proc/self/cgroup names (cgroup v2's `0::/path`, v1's `N:cpu,cpuacct:/path`) under the
    mount of their controller, which a private cgroup namespace shows as `/`."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    mounts: list[tuple[Path, str]] = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if not controllers:
            mounts.append((root, path))
        elif "cpu" in controllers.split(","):
            for name in dict.fromkeys((controllers, "cpu", "cpu,cpuacct", "cpuacct,cpu")):
                mounts.append((root / name, path))
    if not mounts:
        mounts = [(root, "/"), (root / "cpu", "/"), (root / "cpu,cpuacct", "/")]
    folders: list[Path] = []
    for mount, path in mounts:
        folder = mount / path.strip("/")
        while True:
            folders.append(folder)
            if folder == mount:
                break
            folder = folder.parent
    return folders


def _cpu_quota(folder: Path) -> float | None:
    """CPUs' worth of time per period `folder`'s cgroup allows (v2 `cpu.max`, v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`); None when unlimited or unreadable."""
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((folder / "cpu.cfs_quota_us").read_text())
        period_us = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def weight_placement(devices: Sequence[torch.device]) -> dict:
    """`from_pretrained` arguments that put the weights where the replica runs. Over several GPUs,
    accelerate's "balanced" map gives each about the same share of layers (the KV pool of a layer
    lives with it, so an even split leaves each GPU the same room for it), and nothing may be
    offloaded to the CPU."""
    if devices[0].type != "cuda":
        return {}
    if len(devices) == 1:
        return {"device_map": {"": devices[0]}}
    return {
        "device_map": "balanced",
        "max_memory": {**{d.index: torch.cuda.mem_get_info(d)[0] for d in devices}, "cpu": 0},
    }


def kv_cache_budget(devices: Sequence[torch.device], *, gpu_fraction: float = 0.9) -> int:
    """Bytes the KV pool may take on the replica's devices when not configured, measured after the
    model is loaded: a share of the free GPU memory (the rest is for activations; over several
    GPUs, each layer's pool sits with the layer, so the GPU with the least room sets the share of
    every one), or a quarter of the available RAM on CPU (the pool is committed at startup;
    tokenizers, images and other replicas need the rest)."""
    if devices[0].type == "cuda":
        free = min(torch.cuda.mem_get_info(d)[0] for d in devices)
        return int(free * gpu_fraction) * len(devices)
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
