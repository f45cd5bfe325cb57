"""Where replicas run: GPUs grouped by GPUS_PER_REPLICA, and the weight placement asked of
transformers. Pure logic, checked on CPU with the number of visible GPUs faked."""

from __future__ import annotations

import pytest
import torch

from models import devices
from models.devices import group_placements, placement_devices, resolve_devices, weight_placement


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 4)


def test_one_gpu_per_replica_by_default(four_gpus):
    assert resolve_devices(gpu_count=2) == ["cuda:0", "cuda:1"]
    assert resolve_devices(gpu_ids=[3, 1]) == ["cuda:3", "cuda:1"]


def test_gpus_are_grouped_into_replicas_in_the_order_selected(four_gpus):
    assert resolve_devices(gpu_count=4, gpus_per_replica=2) == ["cuda:0+cuda:1", "cuda:2+cuda:3"]
    assert resolve_devices(gpu_ids=[2, 3, 0, 1], gpus_per_replica=4) == ["cuda:2+cuda:3+cuda:0+cuda:1"]
    # Without a count, one replica's worth of GPUs.
    assert resolve_devices(gpus_per_replica=2) == ["cuda:0+cuda:1"]


def test_a_selection_the_replica_size_does_not_divide_fails_clearly(four_gpus):
    with pytest.raises(ValueError, match="GPUS_PER_REPLICA=2 does not divide the 3 selected GPU"):
        resolve_devices(gpu_count=3, gpus_per_replica=2)
    with pytest.raises(ValueError, match="only 4"):
        resolve_devices(gpus_per_replica=8)


def test_cpu_replicas_ignore_gpus_per_replica(monkeypatch):
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 0)
    assert resolve_devices(device="cpu", cpu_replicas=2, gpus_per_replica=2) == ["cpu", "cpu"]
    assert group_placements(["cpu"], 4) == ["cpu"]


def test_placement_names_split_back_into_devices():
    assert placement_devices("cuda:0+cuda:1") == ["cuda:0", "cuda:1"]
    assert placement_devices("cpu") == ["cpu"]


def test_weight_placement(monkeypatch):
    assert weight_placement([torch.device("cpu")]) == {}
    one = torch.device("cuda", 1)
    assert weight_placement([one]) == {"device_map": {"": one}}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (10 * (torch.device(d).index + 1), 100))
    spread = weight_placement([torch.device("cuda", 0), torch.device("cuda", 2)])
    assert spread == {"device_map": "balanced", "max_memory": {0: 10, 2: 30, "cpu": 0}}


def test_kv_budget_over_several_gpus_is_set_by_the_fullest(monkeypatch):
    monkeypatch.setattr(
        torch.cuda, "mem_get_info", lambda d: ({0: 1000, 1: 400}[torch.device(d).index], 2000)
    )
    budget = devices.kv_cache_budget([torch.device("cuda", 0), torch.device("cuda", 1)], gpu_fraction=0.5)
    assert budget == 400


def test_the_settings_pick_the_placements(four_gpus):
    """The one mapping from settings to devices, shared by the entrypoint's check and the lifespan."""
    from app.settings import Settings

    settings = Settings(gpu_count=4, gpus_per_replica=2, device="cuda")
    assert resolve_devices(**settings.device_selection()) == ["cuda:0+cuda:1", "cuda:2+cuda:3"]


def test_cpu_threads_come_from_the_pods_cores_and_an_explicit_omp_num_threads(tmp_path, monkeypatch):
    """os.cpu_count() is the node's: under a Kubernetes CPU limit of 4 on a 64-core node each
    replica ran 64 threads; and an operator's OMP_NUM_THREADS was overwritten."""
    import os

    from models import devices

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    v2_namespaced = tmp_path / "v2-proc"
    v2_namespaced.write_text("0::/\n")
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("400000 100000\n")
    assert devices.usable_cores(str(v2), str(v2_namespaced)) == 4
    (v2 / "cpu.max").write_text("150000 100000\n")  # 1500m: one thread, not two throttled ones
    assert devices.usable_cores(str(v2), str(v2_namespaced)) == 1
    (v2 / "cpu.max").write_text("max 100000\n")
    assert devices.usable_cores(str(v2), str(v2_namespaced)) == 64
    # No private cgroup namespace (docker --cgroupns=host, a systemd unit): the process's own
    # cgroup, and a limit set on a parent (the pod's) counts.
    host_view = tmp_path / "v2-host-proc"
    host_view.write_text("0::/kubepods/pod1/container\n")
    (v2 / "kubepods" / "pod1" / "container").mkdir(parents=True)
    (v2 / "kubepods" / "pod1" / "cpu.max").write_text("200000 100000\n")
    (v2 / "kubepods" / "pod1" / "container" / "cpu.max").write_text("max 100000\n")
    assert devices.usable_cores(str(v2), str(host_view)) == 2
    v1_proc = tmp_path / "v1-proc"
    v1_proc.write_text("4:memory:/x\n3:cpuacct,cpu:/\n")
    v1 = tmp_path / "v1"
    (v1 / "cpuacct,cpu").mkdir(parents=True)
    (v1 / "cpuacct,cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpuacct,cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert devices.usable_cores(str(v1), str(v1_proc)) == 2
    (v1 / "cpuacct,cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert devices.usable_cores(str(v1), str(v1_proc)) == 64
    assert devices.usable_cores(str(tmp_path / "none"), str(tmp_path / "no-proc")) == 64
    monkeypatch.setattr(devices, "usable_cores", lambda: 4)
    assert devices.cpu_threads_per_replica(2, {}) == 2
    assert devices.cpu_threads_per_replica(8, {}) == 1
    assert devices.cpu_threads_per_replica(2, {"OMP_NUM_THREADS": "3"}) == 3  # a team's size: per replica
    assert devices.cpu_threads_per_replica(2, {"OMP_NUM_THREADS": " 4,2 "}) == 4  # nested: the outer team
    for careless in ("0", "lots", "\u00b2", "-1", ""):
        assert devices.cpu_threads_per_replica(1, {"OMP_NUM_THREADS": careless}) == 4, careless
