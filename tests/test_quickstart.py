"""The quickstart runs end to end with tiny settings, writes its outputs and keeps its console
free of third-party chatter."""

import os
import re
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest

from cellplm_scvi.metrics import cluster, linear_probe
from cellplm_scvi.quickstart import format_table, main, spatial_mean

N_CELLS = 600
N_LATENT = 32  # the quickstart's default network
SCORE_KEYS = ("cell_type_f1", "niche_f1", "responder_f1", "niche_ari", "seconds")


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """One run of ``python -m cellplm_scvi.quickstart`` (600 cells, one epoch): (output folder,
    scores read from its printed table, console lines). The console tests and the output tests
    share it, so the quickstart runs once."""
    cwd = tmp_path_factory.mktemp("quickstart")
    proc = subprocess.run(
        [sys.executable, "-m", "cellplm_scvi.quickstart", "--n-cells", str(N_CELLS), "--epochs",
         "1", "--seed", "0", "--out", "out"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    lines = [part.strip() for line in console.splitlines() for part in line.split("\r")]
    scores = {}
    for line in lines:
        row = SCORE_ROW.fullmatch(line)
        if row:
            values = [float(v) for v in row.group(2).split()]
            scores[row.group(1)] = dict(zip(SCORE_KEYS, values))
    return cwd / "out", scores, lines


def test_outputs_written(quickstart):
    out, _, _ = quickstart
    png = out / "quickstart.png"
    assert png.is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    adata = ad.read_h5ad(out / "quickstart.h5ad")
    assert adata.n_obs == N_CELLS
    assert adata.obsm["X_cellplm"].shape == (N_CELLS, N_LATENT)
    assert adata.obsm["X_cellplm_niche"].shape == (N_CELLS, N_LATENT)
    assert np.isfinite(adata.obsm["X_cellplm_niche"]).all()
    assert not np.allclose(adata.obsm["X_cellplm_niche"], adata.obsm["X_cellplm"])
    assert np.isfinite(adata.obsm["X_cellplm"]).all()
    assert adata.obsm["X_umap"].shape == (N_CELLS, 2)
    assert "cellplm_tissue" in adata.obs
    assert adata.obs["cellplm_niche_cluster"].nunique() == adata.obs["niche"].nunique()
    # counts are kept for the model, X is log-normalised for the PCA baseline
    counts = adata.layers["counts"]
    assert np.array_equal(counts.data, np.round(counts.data))
    model_dir = out / "model"
    assert model_dir.is_dir()
    assert any(model_dir.iterdir())


def test_scores(quickstart):
    _, scores, _ = quickstart
    assert set(scores) == {"CellPLM", "CellPLM niche", "CellPLM cell + niche", "PCA"} | {
        "PCA + spatial"
    }
    for row in scores.values():
        assert set(row) == {"cell_type_f1", "niche_f1", "responder_f1", "niche_ari", "seconds"}
        for key in ("cell_type_f1", "niche_f1", "responder_f1"):
            assert 0.0 <= row[key] <= 1.0
        assert -1.0 <= row["niche_ari"] <= 1.0
        assert row["seconds"] >= 0.0
    # 10 cell types (chance macro-F1 ~0.1): PCA of real PBMC profiles separates them well
    assert scores["PCA"]["cell_type_f1"] > 0.5
    # the spatial baseline sees the niche (5 niches, chance ~0.2)
    assert scores["PCA + spatial"]["niche_f1"] > scores["PCA"]["niche_f1"]
    assert scores["PCA + spatial"]["niche_ari"] > scores["PCA"]["niche_ari"]
    # responders sit next to monocytes: their own PCA profile does not show it, the neighbours do
    assert scores["PCA + spatial"]["responder_f1"] > scores["PCA"]["responder_f1"]
    table = format_table(scores)
    assert all(name in table for name in scores)


def test_model_loads(quickstart):
    from cellplm_scvi import CellPLM

    out, _, _ = quickstart
    adata = ad.read_h5ad(out / "quickstart.h5ad")
    model = CellPLM.load(out / "model", adata=adata)
    z = model.get_latent_representation()
    np.testing.assert_allclose(z, adata.obsm["X_cellplm"], rtol=1e-4, atol=1e-4)


def test_linear_probe_chance_and_perfect():
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 50)
    separable = np.eye(3)[np.repeat([0, 1, 2], 50)] + 0.01 * rng.normal(size=(150, 3))
    assert linear_probe(separable, labels) == 1.0
    assert linear_probe(rng.normal(size=(150, 3)), labels) < 0.6


def test_linear_probe_positive_label():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(20, bool), np.zeros(180, bool)]  # a rare label, as the responders
    features = labels[:, None] + 0.1 * rng.normal(size=(200, 1))
    assert linear_probe(features, labels, positive="True") == 1.0
    assert linear_probe(rng.normal(size=(200, 1)), labels, positive="True") < 0.4
    with pytest.raises(ValueError, match="positive='yes'"):
        linear_probe(features, labels, positive="yes")


def test_cluster_recovers_separated_groups():
    rng = np.random.default_rng(0)
    groups = np.repeat([0, 1, 2], 40)
    features = 10 * np.eye(3)[groups] + rng.normal(size=(120, 3))
    labels = cluster(features, 3)
    assert labels.shape == (120,)
    # one cluster per group, up to the naming of the clusters
    assert len({(g, c) for g, c in zip(groups, labels)}) == 3


def test_spatial_mean_stays_within_slide():
    obs_slide = np.repeat(["s0", "s1"], 4)
    adata = ad.AnnData(
        obs={"slide": obs_slide},
        obsm={"spatial": np.tile(np.c_[np.arange(4.0), np.zeros(4)], (2, 1))},
    )
    features = np.r_[np.zeros(4), np.ones(4)][:, None]
    mean = spatial_mean(adata, features, n_neighbors=2)
    np.testing.assert_array_equal(mean[:, 0], features[:, 0])
    # the neighbours of cell 0 are cells 1 and 2 (not itself)
    mean = spatial_mean(adata, np.arange(8.0)[:, None], n_neighbors=2)
    assert mean[0, 0] == pytest.approx(1.5)


def test_main_parses_arguments(monkeypatch):
    import cellplm_scvi.quickstart as quickstart

    seen = {}
    monkeypatch.setattr(quickstart, "run", lambda out, **kwargs: seen.update(out=out, **kwargs))
    main(["--out", "x", "--n-cells", "10", "--epochs", "2", "--seed", "3"])
    assert seen == {"out": "x", "n_cells": 10, "epochs": 2, "seed": 3}


# Lines the quickstart prints itself (and the model summary it shows); anything else on its
# console (a third-party warning, a Lightning hint) fails the test.
OWN_LINES = [
    r"Simulated \d+ cells x \d+ genes on \d+ slide\(s\): .*",
    r"assign_tissues: \d+ tissues of \d+-\d+ cells .*",
    r"CellPLM: preset='\w+', n_hidden=.*",
    r"[a-z_]+=.*|[\d,]+ parameters",  # wrapped lines of the model summary
    r"Training status: .*",
    r"Model's adata is minified\?: .*",
    r"Training for \d+ epochs on the (CPU|GPU):",
    r"representation +cell-type F1 +niche F1 +responder F1 +niche ARI +time \(s\)",
    r"[- ]+",
    r"(CellPLM|CellPLM niche|CellPLM cell \+ niche|PCA|PCA \+ spatial)( +-?\d+\.\d+){5}",
    r"\(F1: linear probe, .*\)",
    r"Rows of the table:",
    r"Panels of .*quickstart\.png:",
    r"\* .*",  # one row or panel explained
    r"Total \d+ s\. Wrote .*quickstart\.png,",
    r".*quickstart\.h5ad \(obsm\['X_cellplm'\], obsm\['X_cellplm_niche'\], obs\[.*\]\)",
    r"and .*model/\.",
]
# a row of the score table: (representation, its five numbers)
SCORE_ROW = re.compile(
    r"(CellPLM|CellPLM niche|CellPLM cell \+ niche|PCA|PCA \+ spatial)((?: +-?\d+\.\d+){5})"
)
# tqdm redraws its bar with carriage returns; each redraw is "Training:" or "Epoch i/n:" ...
PROGRESS = re.compile(r"(Training|Epoch \d+/\d+): +\d+%\|.*")


def test_console_shows_only_own_lines(quickstart):
    """``python -m cellplm_scvi.quickstart``: its lines, the progress bar and nothing else."""
    _, _, lines = quickstart
    foreign = [
        line
        for line in lines
        if line
        and not PROGRESS.fullmatch(line)
        and not any(re.fullmatch(pattern, line) for pattern in OWN_LINES)
    ]
    assert not foreign, "foreign lines on the console:\n" + "\n".join(foreign)
    assert any(PROGRESS.fullmatch(line) for line in lines)  # the progress bar is still there
    assert sum(bool(re.fullmatch(OWN_LINES[9], line)) for line in lines) == 5
    assert sum(line.startswith("* ") for line in lines) == 7  # 5 rows and 2 panels explained
