"""How much of the machine's CPU went to processes other than the benchmark and its server.

On a small shared box (2 cores, with tests and other servers coming and going) a run that competed
for the CPU measures the neighbours, not the server. Each result carries `foreign_cpu_share`: the
fraction of all cores used by anything outside the watched process groups during the run. Linux only;
elsewhere the fields are None.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy_ticks() -> int | None:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle  # guest time is already counted in user


def _processes(pgids: set[int]):
    """(/proc/<pid> folder, stat fields after the command name) of each process in `pgids`."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name may hold spaces and parentheses: fields start after the last ')'.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) in pgids:  # fields[0] is state (field 3 of stat), [2] is pgrp (field 5)
            yield stat.parent, fields


def _group_ticks(pgids: set[int]) -> int:
    # utime, stime, and cutime, cstime: children already reaped (the health poller) count too.
    return sum(sum(int(x) for x in fields[11:15]) for _, fields in _processes(pgids))


def _thread_ticks(pgids: set[int]) -> dict[str, int]:
    """CPU ticks of every thread of the processes in `pgids`, summed by thread name: the server's
    replica threads (and the OpenMP workers they start) are named `replica-N`
    (`scheduler.threads`), its event loop keeps the process's name, granian's threads their own."""
    totals: dict[str, int] = {}
    for folder, _ in _processes(pgids):
        for task in folder.glob("task/[0-9]*"):
            try:
                name = (task / "comm").read_text().strip()
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            totals[name] = totals.get(name, 0) + int(fields[11]) + int(fields[12])
    return totals


class CpuWatch:
    """`with CpuWatch({server_pgid}) as watch: ...` then `watch.result()`; our own group is always watched."""

    def __init__(self, pgids: set[int] | None = None):
        self.servers = set(pgids or ()) - {os.getpgrp()}
        self.pgids = {os.getpgrp(), *self.servers}

    def __enter__(self) -> CpuWatch:
        self._t0, self._busy0, self._group0, self._servers0 = (
            time.monotonic(),
            _machine_busy_ticks(),
            _group_ticks(self.pgids),
            _group_ticks(self.servers),
        )
        self._threads0 = _thread_ticks(self.servers)
        return self

    def __exit__(self, *exc_info) -> None:
        self._t1, self._busy1, self._group1, self._servers1 = (
            time.monotonic(),
            _machine_busy_ticks(),
            _group_ticks(self.pgids),
            _group_ticks(self.servers),
        )
        self._threads1 = _thread_ticks(self.servers)

    def threads_cpu_s(self) -> dict[str, float]:
        """The servers' CPU seconds during the run by thread name (threads that ended are lost)."""
        spent = {name: ticks - self._threads0.get(name, 0) for name, ticks in self._threads1.items()}
        return {name: round(ticks / _HZ, 2) for name, ticks in sorted(spent.items()) if ticks > 0}

    def result(self) -> dict:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        out = {
            # The server's own CPU seconds (its process group), next to the load generator's client_cpu_s.
            "server_cpu_s": round((self._servers1 - self._servers0) / _HZ, 2),
            "server_threads_cpu_s": self.threads_cpu_s(),
            "loadavg_1m": load,
            "foreign_cpu_share": None,
            "watched_cpu_share": None,
        }
        if self._busy0 is None or self._busy1 is None:
            return out
        capacity = (os.cpu_count() or 1) * (self._t1 - self._t0) * _HZ
        if capacity <= 0:
            return out
        busy, ours = self._busy1 - self._busy0, self._group1 - self._group0
        out["loadavg_1m"] = round(load, 2) if load is not None else None
        # A process that exits unreaped, or whose reaper is outside the groups, counts as foreign.
        out["foreign_cpu_share"] = round(max(0.0, busy - ours) / capacity, 3)
        out["watched_cpu_share"] = round(ours / capacity, 3)
        return out
