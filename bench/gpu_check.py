"""`make gpu-check`: the GPU-marked tests, `bench.gpu`, `bench.gpu_serve`, one JSON summary.

    python -m bench.gpu_check [--quick]   # --quick: the 1B model only, batches 1 and 32, no peer

Writes bench/results/<stamp>-gpu-check.json with the card's name, driver, torch and CUDA versions,
the test counts and the benchmark figures. Without a CUDA device it says so and exits 0; with one,
it exits non-zero when a test fails. Everything is built offline from configs (random weights).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

from bench import gpu, gpu_serve
from bench.server import write_results

ROOT = Path(__file__).resolve().parent.parent


def driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def run_tests() -> dict:
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "junit.xml"
        code = subprocess.call(
            [sys.executable, "-m", "pytest", "tests/gpu", "-m", "gpu", "-q", f"--junitxml={report}"], cwd=ROOT
        )
        suite = ElementTree.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    return {"exit_code": code, **counts}


def _latest(kind: str) -> dict | None:
    found = sorted((ROOT / "bench" / "results").glob(f"*-{kind}.json"))
    return json.loads(found[-1].read_text().splitlines()[0]) if found else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device is visible: nothing to check (exit 0)")
        return 0
    summary = {
        "card": torch.cuda.get_device_name(0),
        "cards": torch.cuda.device_count(),
        "driver": driver_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "tests": run_tests(),
    }
    bench_args = ["--models", "1b", "--batches", "1,32"] if args.quick else []
    gpu.main(bench_args)
    summary["bench"] = _latest("gpu")
    if not args.quick:  # ours against transformers serve over HTTP, 1B model, 32 in flight
        gpu_serve.main([])
        summary["serve"] = _latest("gpu-serve")
    out = write_results("gpu-check", [summary])
    print(json.dumps({k: v for k, v in summary.items() if k != "bench"}))
    print(f"gpu-check: summary in {out}")
    return 0 if summary["tests"]["exit_code"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
