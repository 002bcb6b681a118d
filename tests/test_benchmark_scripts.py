"""The GPU benchmark runs rarely (only where a GPU is lent), so its CPU smoke mode is run here:
it must complete all three parts. Nothing about speed is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


NICHE = Path(__file__).parents[1] / "benchmarks" / "bench_niche.py"


@pytest.mark.slow
def test_niche_benchmark_smoke_run_with_peers():
    """bench_niche.py with tiny settings: every representation gets a row with scores in range,
    and a peer whose package is missing is skipped with a printed line (never silently).
    Novae is left out here (about 90 s for 400 cells on 2 cores)."""
    import importlib.util

    args = "--n-cells 300 --epochs 1 --n-hidden 16 --n-layers 1 --skip-controls --scvi-epochs 1"
    proc = subprocess.run(
        [sys.executable, str(NICHE), *args.split(), "--peers", "cellcharter", "scviva"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")[2:-1]
        for line in out.splitlines()
        if line.startswith("| ") and not line.startswith("| representation")
    }
    expected = ["CellPLM squidpy tissues (1 ep)", "PCA (50)", "scVI"]
    expected += ["scVIVA (1 ep, uses true cell types)"]
    expected += [f"{expected[0]}, representation={r!r}" for r in ("niche", "both")]
    if importlib.util.find_spec("cellcharter") is None:
        assert "# skipped CellCharter" in out, out
    else:
        expected += [f"CellCharter({x}), 3 layers" for x in ("PCA", "CellPLM", "scVI")]
    assert set(expected) <= set(rows), out
    assert not any(name.startswith("Novae") for name in rows)
    for name, (niche_f1, type_f1, responder_f1, ari) in rows.items():
        assert all(0 <= float(v) <= 1 for v in (niche_f1, type_f1, responder_f1)), name
        assert -1 <= float(ari) <= 1, name
    # the aggregation sees the neighbours: it recovers the niches better than PCA alone
    if "CellCharter(PCA), 3 layers" in rows:
        assert float(rows["CellCharter(PCA), 3 layers"][0]) > float(rows["PCA (50)"][0])


OFFICIAL_EMBEDDING = Path(__file__).parents[1] / "benchmarks" / "bench_official_embedding.py"


@pytest.mark.slow
@pytest.mark.parametrize("latent", ["gmvae", "vae"])
def test_official_embedding_benchmark_smoke_run(latent):
    """bench_official_embedding.py (the int8 speed figures of issue 16) on 100 cells, one round:
    it completes with the four alternating calls, the int8 accuracy line, and for the VAE
    latent nothing to refine (the two int8 calls are the same computation)."""
    pytest.importorskip("CellPLM")
    args = f"--n-cells 100 --repeats 1 --threads 1 --latent {latent}"
    proc = subprocess.run(
        [sys.executable, str(OFFICIAL_EMBEDDING), *args.split()],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "median of 1 alternating runs: official" in out, out
    cosine = float(out.split("per-cell cosine int8 vs fp32 min ")[1].split(",")[0])
    assert 0.99 < cosine <= 1.0
    if latent == "vae":
        assert "re-ran 0 of 100 cells" in out, out
