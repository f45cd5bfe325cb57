"""Engine configurations for tests, built from Settings exactly as the server builds them (the
defaults live in the settings' declarations only)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from app.lifespan import scheduler_config
from app.settings import Settings
from models.replica import ReplicaConfig
from scheduler.config import ExecutorConfig, SchedulerConfig

CPU_TEST_SETTINGS = {"device": "cpu", "dtype": "fp32", "attn_impl": "sdpa"}


def engine_config(model_path: str | Path = "builtin:tiny", **settings) -> SchedulerConfig:
    return scheduler_config(Settings(model_path=str(model_path), **{**CPU_TEST_SETTINGS, **settings}))


def replica_config(**overrides) -> ReplicaConfig:
    return dataclasses.replace(engine_config().replica, **overrides)


def executor_config(**overrides) -> ExecutorConfig:
    return dataclasses.replace(engine_config().executor, **overrides)
