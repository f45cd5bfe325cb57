"""What the scheduler is built from. The app fills it from its Settings (which hold every default)
and reaches the engine's own configuration types through here, never importing `models`."""

from __future__ import annotations

from dataclasses import dataclass

from models.devices import resolve_devices, set_cpu_threads
from models.images import ImageLimits
from models.loader import LoadSpec
from models.replica import ReplicaConfig
from scheduler.job import ExecutorConfig

__all__ = [
    "ExecutorConfig",
    "ImageLimits",
    "LoadSpec",
    "ReplicaConfig",
    "SchedulerConfig",
    "resolve_devices",
    "set_cpu_threads",
]


@dataclass(frozen=True)
class SchedulerConfig:
    """Built from the server's Settings (`app.lifespan.scheduler_config`), which hold the defaults."""

    load: LoadSpec  # device is filled per replica
    devices: tuple[str, ...]
    replica: ReplicaConfig
    executor: ExecutorConfig
    image_limits: ImageLimits
    retry_after_s: int = 1
