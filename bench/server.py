"""A server under test: one child process in its own process group, ready when its health URL says 200.

Used by `bench.peer` and `bench.compare` alike, so both servers start, wait and stop the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    # Another process could take the port before the server binds it; on a bench machine that is rare.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerError(RuntimeError):
    pass


@dataclass
class Target:
    """How to talk to a server under test."""

    server: str  # label in the results: "ours" or "peer"
    base_url: str  # ends in /v1
    model: str  # the `model` field it accepts
    health_url: str
    api_key: str = "EMPTY"
    # How "ignore EOS" is said to it: True sends `ignore_eos`, else `ignore_eos_body` is merged into the body.
    send_ignore_eos: bool = True
    ignore_eos_body: dict = field(default_factory=dict)


class ServerProcess:
    """`with ServerProcess(cmd, health_url=..., log_path=...):` starts, waits until ready, always stops."""

    def __init__(
        self,
        command: list[str],
        *,
        health_url: str,
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        ready_timeout_s: float = 300.0,
    ):
        self.command, self.health_url, self.log_path = command, health_url, Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.ready_timeout_s = ready_timeout_s
        self.process: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def __enter__(self) -> ServerProcess:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n$ {' '.join(self.command)}\n".encode())
            log.flush()
            # A new session makes the server the leader of its own process group: stop() kills the
            # whole tree (granian workers included) and nothing else.
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        self._started_at = time.perf_counter()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise ServerError(
                        f"server exited with {self.process.returncode} before ready; "
                        f"log tail:\n{self.log_tail()}"
                    )
                try:
                    if client.get(self.health_url).status_code == 200:
                        self.startup_s = time.perf_counter() - self._started_at
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.25)
        raise ServerError(
            f"not ready after {self.ready_timeout_s}s at {self.health_url}; log tail:\n{self.log_tail()}"
        )

    def stop(self, grace_s: float = 10.0) -> None:
        if self.process is None:
            return
        pgid = self.process.pid  # the session leader: its pid is the group id
        if self.process.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, sig)
                try:
                    self.process.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # Workers that outlive their leader (it crashed, or ignored SIGTERM) go with the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)

    def log_tail(self, num_bytes: int = 3000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-num_bytes:].decode(errors="replace")


def write_results(kind: str, rows: list[dict]) -> Path:
    """One JSON line per row in bench/results/<UTC timestamp>-<kind>.json."""
    import json
    from datetime import UTC, datetime

    results = Path(__file__).resolve().parent / "results"
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{kind}.json"
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out
