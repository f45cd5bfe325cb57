"""Where a replica's steps spend their time, by phase, on the replica thread.

Phases: `schedule` (collect new requests, drop cancelled ones, plan the step), `execute` (the
runner: `forward` and `sample` inside it where the runner reports them), `postprocess` (append
each sampled token: detokenize, match stop strings and tokens), `emit` (take each request's
delta and hand them to the event loop), and `handoff` inside it (the hand-off alone: where the
replica thread waits while the event loop holds the GIL). Recent means smoothed over the last few
dozen steps; totals serve benchmarks (`bench.host`).
"""

from __future__ import annotations

import threading

_SMOOTHING = 0.05  # each step weighs this much in the recent figures (about the last 20 steps)


class StepTimings:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.totals: dict[str, float] = {}
        self.steps = 0
        self.rows = 0
        self._recent: dict[str, float] = {}

    def add(self, *, rows: int, **seconds: float) -> None:
        with self._lock:
            self.steps += 1
            self.rows += rows
            for name, value in seconds.items():
                self.totals[name] = self.totals.get(name, 0.0) + value
                previous = self._recent.get(name)
                self._recent[name] = value if previous is None else previous + _SMOOTHING * (value - previous)

    def recent(self) -> dict[str, float]:
        """Milliseconds per step of each phase, smoothed (what /health shows)."""
        with self._lock:
            return {name: round(value * 1000, 3) for name, value in self._recent.items()}

    def per_step(self) -> dict[str, float]:
        """Milliseconds per step of each phase since the last reset."""
        with self._lock:
            steps = max(1, self.steps)
            out = {name: total * 1000 / steps for name, total in self.totals.items()}
            out["rows"] = self.rows / steps
            return out

    def reset(self) -> None:
        with self._lock:
            self.totals.clear()
            self.steps = self.rows = 0
