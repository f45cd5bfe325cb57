"""Builds the benchmark checkpoints with `models.tiny`: a ~88M-parameter Llama and a tiny LLaVA.

    python -m bench.build_model [--out bench/models/bench-80m] [--vlm-out bench/models/tiny-vlm] [--force]

Big enough that a decode step costs real matrix work on a CPU (so batching shows), small enough to
build in seconds. Weights are random: output is noise, but greedy output is deterministic.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = ROOT / "bench" / "models" / "bench-80m"
DEFAULT_VLM_DIR = ROOT / "bench" / "models" / "tiny-vlm"

# Llama-shaped, GQA 12:4. Untied embeddings: 12 * 6.3M per layer + 2 * 8192 * 768 = ~88M parameters.
BENCH_SHAPE = dict(
    arch="llama",
    hidden_size=768,
    num_layers=12,
    num_heads=12,
    num_kv_heads=4,
    intermediate_size=2048,
    max_position_embeddings=4096,
    vocab_size=8192,
    seed=0,
)


def _build_atomically(out_dir: Path, build: Callable[[Path], Path], force: bool) -> Path:
    """Builds beside the target and renames, so a half-written folder is never taken for a model."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file() and not force:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a server running as another user must read it
    try:
        build(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def build_bench_model(out_dir: str | Path = DEFAULT_MODEL_DIR, *, force: bool = False) -> Path:
    from models.tiny import build_text_model

    return _build_atomically(Path(out_dir), lambda path: build_text_model(path, **BENCH_SHAPE), force)


def build_bench_vlm(out_dir: str | Path = DEFAULT_VLM_DIR, *, force: bool = False) -> Path:
    from models.tiny import build_vlm_model

    return _build_atomically(Path(out_dir), lambda path: build_vlm_model(path, seed=0), force)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.build_model", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_MODEL_DIR), help="text model folder")
    parser.add_argument("--vlm-out", default=None, help=f"also build the VLM here (e.g. {DEFAULT_VLM_DIR})")
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder exists")
    args = parser.parse_args(argv)
    print(build_bench_model(args.out, force=args.force))
    if args.vlm_out:
        print(build_bench_vlm(args.vlm_out, force=args.force))


if __name__ == "__main__":
    main()
