"""Our server as a process under test: `entrypoint.py` from the project venv, on a free port."""

from __future__ import annotations

import secrets
from pathlib import Path

from bench.server import ServerProcess, Target, free_port

ROOT = Path(__file__).resolve().parent.parent


def our_server(
    model_path: Path | str,
    model_name: str = "bench",
    *,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    log_path: Path,
    ready_timeout_s: float = 300.0,
    python: str | None = None,
    root: Path = ROOT,
    label: str = "ours",
) -> tuple[ServerProcess, Target]:
    """An unstarted ServerProcess for ours (greedy by default, fp32), and how to talk to it. `root`
    is the checkout to run (its entrypoint.py and .venv): another worktree gives an A/B in one run."""
    port = free_port()
    api_key = secrets.token_hex(8)  # with a key set, requests take the guarded path real clients take
    command = [
        python or str(root / ".venv" / "bin" / "python"),
        str(root / "entrypoint.py"),
        *("--model-path", str(model_path), "--model-name", model_name, "--api-key", api_key),
        *f"--host 127.0.0.1 --port {port} --dtype fp32 --default-sampling false".split(),
        *extra_args,
    ]
    base = f"http://127.0.0.1:{port}"
    server = ServerProcess(
        command,
        health_url=f"{base}/health",
        log_path=log_path,
        env=env,
        cwd=root,
        ready_timeout_s=ready_timeout_s,
    )
    return server, Target(label, f"{base}/v1", model_name, f"{base}/health", api_key=api_key)
