"""A process that burns a set share of one core in short bursts beside a load.

It takes about the CPU that the openai client takes reading 16 streams on the same machine (b),
without the network traffic: a non-streamed run beside it (`a_hog`) shows what a neighbour's CPU
alone costs a server, apart from what streaming itself costs. `python -m bench.hog 0.16`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

# Bursts of duty x 10 ms: in (b) the openai client parsed about 4.6 ms after each 23 ms step.
PERIOD_S = 0.01


def burn(duty: float) -> None:
    parent = os.getppid()
    while os.getppid() == parent:  # a benchmark killed outright leaves no hog behind
        start = time.perf_counter()
        while time.perf_counter() - start < duty * PERIOD_S:
            pass
        time.sleep(PERIOD_S * (1 - duty))


@contextlib.contextmanager
def cpu_hog(duty: float) -> Iterator[dict]:
    """Runs the hog while the block runs; the dict gets its share and `hog_cpu_s`, the CPU
    seconds it took."""
    if duty <= 0:
        yield {}
        return
    out: dict = {"hog_share_of_core": duty}
    process = subprocess.Popen([sys.executable, "-m", "bench.hog", str(duty)])
    try:
        yield out
    finally:
        process.send_signal(signal.SIGKILL)
        _, _, usage = os.wait4(process.pid, 0)
        process.returncode = -signal.SIGKILL
        out["hog_cpu_s"] = round(usage.ru_utime + usage.ru_stime, 3)


if __name__ == "__main__":
    burn(min(1.0, max(0.0, float(sys.argv[1]))))
