"""The reference server: `transformers serve --continuous-batching`, in its own venv (bench/.venv-peer).

    python -m bench.peer setup                      # create the venv, install the pinned peer
    python -m bench.peer serve --model-path DIR     # start it on a free port, print its URLs, wait for Ctrl-C

Why a separate venv: `transformers[serving]` pulls fastapi, uvicorn, a newer openai, accelerate and
pydantic, none of which the project needs. torch is pinned to the project's version so pip takes the
local CPU wheel instead of downloading another build.

Notes on transformers 5.23 `serve` that matter to a benchmark:
- the positional MODEL pins the server to it, and every request's `model` must then be exactly that
  string (the folder path as given) or be rejected with 400;
- `ignore_eos` (any unknown body field) is a 422. Its equivalent is a per-request `generation_config`
  JSON string with `eos_token_id: -1`, which continuous batching honours per request (see PEER_IGNORE_EOS);
- the first chat request initializes continuous batching (several seconds): warm up before measuring;
- streams send usage on the last chunk whether or not `stream_options` asks (it is ignored), and end
  without `data: [DONE]`;
- the checkpoint's dtype is used unless `--dtype` says otherwise: tiny models are saved in bf16, which
  is slow on CPU, so the peer gets `--dtype float32` like ours gets `--dtype fp32`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import venv
from dataclasses import asdict
from pathlib import Path

from bench.server import ServerProcess, Target, free_port

ROOT = Path(__file__).resolve().parent.parent
PEER_VENV = ROOT / "bench" / ".venv-peer"
PEER_REQUIREMENTS = ("torch==2.13.0", "transformers[serving]==5.23.0")
# The body's generation_config replaces the model's wholesale, so greedy must be said again.
PEER_IGNORE_EOS = {"generation_config": json.dumps({"eos_token_id": -1, "do_sample": False})}
PEER_ENV = {
    # Local folders only; no hub calls, no PyPI update check at CLI start.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
_CHECK = (
    "import fastapi, uvicorn, openai, torch, transformers; "
    "assert transformers.__version__ == '5.23.0', transformers.__version__; "
    "assert torch.__version__.startswith('2.13.0'), torch.__version__"
)


def _venv_python(venv_dir: Path) -> Path:
    return venv_dir / "bin" / "python"


def peer_is_installed(venv_dir: Path = PEER_VENV) -> bool:
    python = _venv_python(venv_dir)
    if not python.exists():
        return False
    return subprocess.run([str(python), "-c", _CHECK], capture_output=True, timeout=120).returncode == 0


def ensure_peer_venv(venv_dir: Path = PEER_VENV, *, timeout_s: float = 1200.0) -> Path:
    """The peer venv's python, creating the venv and installing the pinned peer when needed."""
    venv_dir = Path(venv_dir)
    if peer_is_installed(venv_dir):
        return _venv_python(venv_dir)
    print(f"[peer] installing {' '.join(PEER_REQUIREMENTS)} into {venv_dir}", file=sys.stderr, flush=True)
    venv.EnvBuilder(with_pip=True, clear=venv_dir.exists()).create(venv_dir)
    python = _venv_python(venv_dir)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", *PEER_REQUIREMENTS], check=True, timeout=timeout_s
    )
    if not peer_is_installed(venv_dir):
        raise RuntimeError(f"peer venv at {venv_dir} failed its import check after install")
    return python


def peer_command(
    python: Path, model_path: Path | str, port: int, extra_args: tuple[str, ...] = ()
) -> list[str]:
    return [
        *(str(python), "-m", "transformers.cli.transformers", "serve", str(model_path)),
        *f"--continuous-batching --host 127.0.0.1 --port {port} --device cpu --dtype float32".split(),
        *"--attn-implementation sdpa --log-level warning".split(),
        *extra_args,
    ]


def peer_server(
    model_path: Path | str,
    *,
    port: int | None = None,
    log_path: Path | None = None,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 300.0,
    python: Path | None = None,
) -> tuple[ServerProcess, Target]:
    """An unstarted ServerProcess for the peer, and how to talk to it: run by `python` when given
    (an environment that already has `transformers[serving]`), else from bench/.venv-peer."""
    python = python or ensure_peer_venv()
    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    server = ServerProcess(
        peer_command(python, model_path, port, extra_args),
        health_url=f"{base}/health",
        log_path=log_path or ROOT / "bench" / "results" / "peer.log",
        env={**PEER_ENV, **(env or {})},
        cwd=ROOT,
        ready_timeout_s=ready_timeout_s,
    )
    target = Target(
        "peer", f"{base}/v1", str(model_path), f"{base}/health",
        send_ignore_eos=False, ignore_eos_body=PEER_IGNORE_EOS,
    )  # fmt: skip
    return server, target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("setup", help="create bench/.venv-peer and install the peer")
    serve = sub.add_parser("serve", help="start the peer and keep it up until interrupted")
    serve.add_argument("--model-path", default=str(ROOT / "bench" / "models" / "bench-80m"))
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--max-seconds", type=float, default=3600.0, help="stop by itself after this long")
    args, extra = parser.parse_known_args(argv)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the finally blocks stop every server started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.cmd == "setup":
        print(ensure_peer_venv())
        return
    server, target = peer_server(args.model_path, port=args.port, extra_args=tuple(extra))
    with server:
        print(
            json.dumps(
                {**asdict(target), "pid": server.process.pid, "startup_s": round(server.startup_s, 2)}
            ),
            flush=True,
        )
        try:
            time.sleep(args.max_seconds)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
