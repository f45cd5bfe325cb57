"""Polls a health URL while a load runs and keeps the latencies.

The poller is a separate process: in a thread it would wait for the GIL behind the load generator's
event loop, and that wait would be charged to the server's /health.
"""

from __future__ import annotations

import multiprocessing
import time

import httpx


def _poll(url: str, interval_s: float, headers: dict, stop, ready, conn) -> None:
    latencies_ms: list[float] = []
    errors = 0
    with httpx.Client(timeout=5.0, headers=headers) as client:
        ready.set()
        while not stop.is_set():
            start = time.perf_counter()
            try:
                client.get(url).raise_for_status()
                latencies_ms.append((time.perf_counter() - start) * 1000)
            except httpx.HTTPError:
                errors += 1
            stop.wait(max(0.0, interval_s - (time.perf_counter() - start)))
    conn.send((latencies_ms, errors))
    conn.close()


class HealthSampler:
    """`with HealthSampler(url) as health: ...`; afterwards `health.latencies_ms` and `health.errors`."""

    def __init__(self, url: str, interval_s: float = 0.05, headers: dict | None = None):
        self.latencies_ms: list[float] = []
        self.errors = 0
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds threads and sockets
        self._stop, self._ready = ctx.Event(), ctx.Event()
        self._results, child_conn = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=_poll,
            args=(url, interval_s, headers or {}, self._stop, self._ready, child_conn),
            name="health-sampler",
            daemon=True,
        )

    def __enter__(self) -> HealthSampler:
        self._process.start()
        deadline = time.monotonic() + 30
        while not self._ready.wait(0.05):
            if not self._process.is_alive() or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"health poller did not start (exit code {self._process.exitcode})")
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        try:
            if self._results.poll(30):
                self.latencies_ms, self.errors = self._results.recv()
        except EOFError:  # the poller died: no samples, which the results show as health_samples 0
            pass
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
