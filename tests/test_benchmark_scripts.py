"""The GPU benchmark runs rarely (only where a GPU is lent), so its CPU smoke mode is run here:
it must complete all three parts. Nothing about speed is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "bench_gpu.py"


def test_gpu_benchmark_smoke_run_on_cpu():
    args = "--device cpu --small --n-cells 150 --n-tissues 2 --precisions 32 bf16"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            *args.split(),
            "--train-precisions",
            "32",
            "--train-epochs",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for part in ("1. get_latent_representation", "2. encoder alone", "3. model.train"):
        assert part in out, out
    bf16 = [line for line in out.splitlines() if "precision bf16" in line and "cells/s" in line]
    assert len(bf16) == 1, out
    bf16 = bf16[0]
    relative = float(bf16.rsplit("relative", 1)[1])
    assert 0 < relative < 5e-2  # autocast was on, and close to float32
    assert "finite: True" in out
