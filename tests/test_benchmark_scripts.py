"""Smoke runs of the maintained benchmarks (``benchmarks/*.py``): each script runs end to end at
tiny sizes and prints rows whose figures are in range. Nothing about speed is asserted. The
one-off studies in ``benchmarks/experiments/`` are not run.

Each script runs as a program (``python script args``), in a process forked from a server that
has imported ``cellplm_scvi`` once (``tests/_helpers.py:start_script``): the import of
scvi-tools alone costs about 7 s of CPU, more than most smoke runs. A script that patches a
module or seeds the random state does so in its own process only.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from tests._helpers import finish_script, start_script

ROOT = Path(__file__).parents[1]
BENCHMARKS = ROOT / "benchmarks"
HAS_OFFICIAL = importlib.util.find_spec("CellPLM") is not None
needs_official = pytest.mark.skipif(not HAS_OFFICIAL, reason="needs the official CellPLM package")

# every maintained script, with the test that smoke-runs it
SMOKE_TESTED = {
    "bench_annotation.py": "test_annotation_benchmark",
    "bench_corpus.py": "test_corpus_benchmark",
    "bench_de.py": "test_de_benchmark",
    "bench_defaults.py": "test_defaults_benchmark",
    "bench_denoising.py": "test_denoising_benchmark",
    "bench_extend_vocabulary.py": "test_extend_vocabulary_benchmark",
    "bench_gene_token.py": "test_gene_token_benchmark",
    "bench_gpu.py": "test_gpu_benchmark_on_cpu",
    "bench_imputation.py": "test_imputation_benchmark",
    "bench_memory.py": "test_memory_benchmark",
    "bench_niche.py": "test_niche_benchmark_with_peers",
    "bench_official_embedding.py": "test_official_embedding_benchmark",
    "bench_official_recipes.py": "test_official_recipes_benchmark",
    "bench_out_of_core.py": "test_out_of_core_benchmark",
    "bench_packing.py": "test_packing_benchmark",
    "bench_perturbation.py": "test_perturbation_benchmark",
    "bench_train_step.py": "test_train_step_benchmark",
}


def run_script(name: str, args: str, tmp_path: Path, timeout: float = 600) -> str:
    """stdout + stderr of ``python benchmarks/<name> <args>``; fails on a non-zero exit."""
    assert name in SMOKE_TESTED, f"add {name} to SMOKE_TESTED"
    log = tmp_path / f"{name}.log"
    process = start_script([BENCHMARKS / name, *args.split()], log)
    exitcode, out = finish_script(process, log, timeout)
    assert exitcode == 0, out[-3000:]
    return out


def table(out: str, title: str) -> dict[str, list[str]]:
    """The rows (first cell -> other cells) of the markdown table under ``## <title>...``."""
    rows, inside, header = {}, False, False
    for line in out.splitlines():
        if line.startswith("## "):
            inside, header = line[3:].startswith(title), True
        elif inside and line.startswith("| "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not header:
                rows[cells[0]] = cells[1:]
            header = False
    assert rows, f"no table {title!r} in:\n{out}"
    return rows


def test_every_maintained_script_has_a_smoke_run():
    """A script in ``benchmarks/`` is maintained: it has a smoke run here, and the README
    documents it (the experiments too)."""
    scripts = {p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(SMOKE_TESTED)
    assert all(test in globals() for test in SMOKE_TESTED.values())
    readme = (BENCHMARKS / "README.md").read_text()
    experiments = {f"experiments/{p.name}" for p in (BENCHMARKS / "experiments").glob("*.py")}
    missing = [s for s in sorted(scripts | experiments) if f"`{s}`" not in readme]
    assert not missing, f"not in benchmarks/README.md: {missing}"


def test_links_to_benchmark_files_exist():
    """Paths ``benchmarks/...`` named in the user docs and in the benchmarks' README exist."""
    docs = [ROOT / "README.md", BENCHMARKS / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    docs = [
        d for d in docs if d.exists() and d.name != "changelog.md"
    ]  # history may name old files
    named = {
        (doc.name, path.rstrip(".,:)"))
        for doc in docs
        for path in re.findall(r"benchmarks/[\w./-]+", doc.read_text())
    }
    missing = sorted((doc, path) for doc, path in named if not (ROOT / path).exists())
    assert not missing


# ------------------------------------------------------------------------------ tasks
@pytest.mark.slow
def test_annotation_benchmark(tmp_path):
    args = "--epochs 1 --scvi-epochs 1 --scanvi-epochs 1 --n-hidden 16 --n-layers 1"
    rows = table(run_script("bench_annotation.py", args, tmp_path), "Annotation")
    assert set(rows) == {"CellPLM (1 ep)", "PCA(50) + LogReg", "scANVI (1+1 ep)"}
    for name, (f1, balanced, accuracy, _) in rows.items():
        assert all(0 <= float(v) <= 1 for v in (f1, balanced, accuracy)), name


@pytest.mark.slow
def test_denoising_benchmark(tmp_path):
    args = "--epochs 1 --scvi-epochs 1 --n-hidden 16 --n-layers 1"
    rows = table(run_script("bench_denoising.py", args, tmp_path), "Denoising")
    assert {"CellPLM (1 ep)", "scVI (1 ep)", "gene mean (corrupted data)"} <= set(rows)
    floor = float(rows["no denoising (corrupted input)"][0])  # predicts 0 at hidden entries
    for name in ("CellPLM (1 ep)", "scVI (1 ep)"):
        rmse, mae, pearson, cosine = map(float, rows[name][:4])
        assert 0 < mae <= rmse < floor and -1 <= pearson <= 1 and 0 <= cosine <= 1, name


@pytest.mark.slow
def test_imputation_benchmark(tmp_path):
    args = "--n-cells 300 --epochs 1 --gimvi-epochs 1 --n-hidden 16 --n-layers 1"
    rows = table(run_script("bench_imputation.py", args, tmp_path), "Spatial imputation")
    assert {"CellPLM (1 ep)", "gimVI (1 ep)", "kNN mapping (k=10)"} <= set(rows), rows
    for name, (pearson, cosine, rmse, *_) in rows.items():
        assert -1 <= float(pearson) <= 1 and 0 <= float(cosine) <= 1 and float(rmse) > 0, name


@pytest.mark.slow
def test_extend_vocabulary_benchmark(tmp_path):
    """The extended models predict the genes outside the vocabulary; the model without them
    cannot, and says so."""
    args = "--epochs 1 --n-hidden 16 --n-layers 1 --rename 5"
    out = run_script("bench_extend_vocabulary.py", args, tmp_path)
    rows = table(out, "Imputation of")
    assert set(rows) == {
        "CellPLM extended, all parameters (1 ep)",
        "CellPLM extended, new rows only (1 ep)",
        "CellPLM not extended (1 ep)",
        "reference mean x library",
        "reference mean (constant per gene)",
    }, rows
    assert rows["CellPLM not extended (1 ep)"][:3] == ["n/a"] * 3
    assert "cannot predict" in rows["CellPLM not extended (1 ep)"][-1]
    assert rows["reference mean (constant per gene)"][0] == "undefined"
    for name, (pearson, cosine, rmse, *_) in rows.items():
        if "not extended" not in name:
            assert 0 <= float(cosine) <= 1 and float(rmse) > 0, name
        if "CellPLM extended" in name:
            assert -1 <= float(pearson) <= 1, name


@pytest.mark.slow
def test_de_benchmark(tmp_path):
    """CellPLM only (scVI's DE over 10 cell types would double the time)."""
    args = "--epochs 1 --n-hidden 16 --n-layers 1 --null-groups 1 --skip-scvi --de-samples 500"
    out = run_script("bench_de.py", args, tmp_path)
    rows = table(out, "Overlap of the top-20")
    types = [name for name in rows if not name.startswith(("mean", "range"))]
    assert len(types) == 10, rows
    assert all(0 <= int(rows[t][1]) <= 20 for t in types), rows  # the CellPLM column
    assert len(table(out, "Null test")) == 1


@pytest.mark.slow
def test_defaults_benchmark(tmp_path):
    """Every figure of both methods in range, on 300 simulated cells, 2 epochs each."""
    args = "--data sim --n-cells 300 --max-epochs 2 --scvi-max-epochs 2 --n-hidden 16 --n-layers 1"
    args += " --de-samples 500"
    out = run_script("bench_defaults.py", args, tmp_path)
    rows = table(out, "Defaults on sim")
    for name in ("CellPLM", "SCVI"):
        cell_type, niche, de, annotation = map(float, rows[name][:4])
        assert all(0 <= f1 <= 1 for f1 in (cell_type, niche, annotation)), rows
        assert 0 <= de <= 20, rows
        assert float(rows[name][-1]) > 0, rows  # CPU time relative to SCVI's
    assert "2 epochs x" in out and "change over the last 10% of steps" in out, out


@pytest.mark.slow
def test_niche_benchmark_with_peers(tmp_path):
    """Every representation gets a row with scores in range, and a peer whose package is missing
    is skipped with a printed line (never silently). Novae is left out here (about 90 s for 400
    cells on 2 cores)."""
    args = "--n-cells 300 --epochs 1 --n-hidden 16 --n-layers 1 --skip-controls --scvi-epochs 1"
    out = run_script("bench_niche.py", f"{args} --peers cellcharter scviva", tmp_path)
    rows = {name: cells[1:] for name, cells in table(out, "Linear probe").items()}
    expected = ["CellPLM squidpy tissues (1 ep)", "PCA (50)", "scVI"]
    expected += ["scVIVA (1 ep, uses true cell types)"]
    expected += [f"{expected[0]}, representation={r!r}" for r in ("niche", "both")]
    if importlib.util.find_spec("cellcharter") is None:
        assert "# skipped CellCharter" in out, out
    else:
        expected += [f"CellCharter({x}), 3 layers" for x in ("PCA", "CellPLM", "scVI")]
    assert set(expected) <= set(rows), out
    assert not any(name.startswith("Novae") for name in rows)
    for name, (niche_f1, type_f1, responder_f1, ari, _) in rows.items():
        assert all(0 <= float(v) <= 1 for v in (niche_f1, type_f1, responder_f1)), name
        assert -1 <= float(ari) <= 1, name
    # the aggregation sees the neighbours: it recovers the niches better than PCA alone
    if "CellCharter(PCA), 3 layers" in rows:
        assert float(rows["CellCharter(PCA), 3 layers"][0]) > float(rows["PCA (50)"][0])


@pytest.mark.slow
def test_perturbation_benchmark(tmp_path):
    """Two split seeds of a tiny screen: every baseline gets a row in each table, with scores
    in range; CellPLM and GEARS get rows or a printed reason."""
    args = "--small --split-seeds 0 1 --epochs 1 --n-hidden 16 --n-layers 1 --gears-epochs 1"
    out = run_script("bench_perturbation.py", args, tmp_path)
    import cellplm_scvi as cp

    methods = {"no-change", "train-mean", "linear"}
    if hasattr(cp.CellPLM, "predict_perturbation"):
        methods |= {"CellPLM", "CellPLM (random official weights)"}
    else:
        assert "# skipped CellPLM" in out, out
    if "# skipped GEARS" not in out:
        methods.add("GEARS")
    for title in ("Unseen doubles (both", "Unseen singles", "Doubles with an unseen gene"):
        rows = table(out, title)
        expected = methods | {"additive"} if title.startswith("Unseen doubles") else methods
        assert set(rows) == expected, (title, out)
        for name, (pearson, pearson_top, mse, mse_top, n) in rows.items():
            for value in (pearson, pearson_top):
                assert value == "n/a" if name == "no-change" else -1 <= float(value[:6]) <= 1
            assert float(mse[:5]) >= 0 and float(mse_top[:5]) >= 0 and float(n) > 0, name
    assert "mean ± sd over 2 split seeds" in out


@needs_official
@pytest.mark.slow
@pytest.mark.parametrize("task", ["annotation", "imputation"])
def test_official_recipes_benchmark(task, tmp_path):
    """The official pipeline and our recipe fine-tune the same checkpoint side by side."""
    args = f"--task {task} --seeds 1 --epochs 1 --n-hidden 16 --n-cells 200"
    out = run_script("bench_official_recipes.py", args, tmp_path)
    seed_0 = table(out, task.capitalize())["0"]
    if task == "annotation":  # official F1, ours F1
        assert all(0 <= float(f1) <= 1 for f1 in seed_0[:2]), out
    else:  # official r, ours r ("all"), ours r ("measured"), "all" - official
        assert all(-1 <= float(r) <= 1 for r in seed_0[:3]), out
        assert abs(float(seed_0[3])) < 0.05, out  # same checkpoint, data, groups and epochs


# ------------------------------------------------------------------------------ speed, memory
def test_gpu_benchmark_on_cpu(tmp_path):
    """The GPU benchmark runs rarely (only where a GPU is lent), so its CPU mode is run here: it
    must complete all three parts."""
    args = "--device cpu --small --n-cells 150 --n-tissues 2 --precisions 32 bf16"
    args += " --train-precisions 32 --train-epochs 1"
    out = run_script("bench_gpu.py", args, tmp_path)
    for part in ("1. get_latent_representation", "2. encoder alone", "3. model.train"):
        assert part in out, out
    bf16 = [line for line in out.splitlines() if "precision bf16" in line and "cells/s" in line]
    assert len(bf16) == 1, out
    relative = float(bf16[0].rsplit("relative", 1)[1])
    assert 0 < relative < 5e-2  # autocast was on, and close to float32
    assert "finite: True" in out


@needs_official
@pytest.mark.slow
@pytest.mark.parametrize("latent", ["gmvae", "vae"])
def test_official_embedding_benchmark(latent, tmp_path):
    """The int8 speed figures' script on 100 cells, one round: it completes with the four
    alternating calls, the int8 accuracy line, and for the VAE latent nothing to refine (the
    two int8 calls are the same computation)."""
    args = f"--n-cells 100 --repeats 1 --threads 1 --latent {latent}"
    out = run_script("bench_official_embedding.py", args, tmp_path)
    assert "median of 1 alternating runs: official" in out, out
    cosine = float(out.split("per-cell cosine int8 vs fp32 min ")[1].split(",")[0])
    assert 0.99 < cosine <= 1.0
    if latent == "vae":
        assert "re-ran 0 of 100 cells" in out, out


@pytest.mark.slow
def test_memory_benchmark(tmp_path):
    """Two sizes of the 85M model's embedding (and the official pipeline's, where installed)."""
    args = "--n-cells 100 200" + (" --official --official-n-cells 100" if HAS_OFFICIAL else "")
    out = run_script("bench_memory.py", args, tmp_path)
    assert re.search(r"N=\s+100: .* z \(100, 512\)", out), out
    assert re.search(r"N=\s+200: .* z \(200, 512\)", out), out
    assert "growth between N=100 and N=200" in out
    if HAS_OFFICIAL:
        assert "emb (100, 512)" in out, out


@pytest.mark.slow
def test_gene_token_benchmark(tmp_path):
    args = "--n-cells 100 --repeats 1 --gt-cells 2 --gt-batch 1 --seq-len 64"
    out = run_script("bench_gene_token.py", args, tmp_path)
    assert "z (100, 512)" in out and "ratio CellPLM / gene-token (d_hid 512): x" in out, out


@needs_official
@pytest.mark.slow
def test_train_step_benchmark(tmp_path):
    """One step of ours and of the official model on the same weights, masks and seeds: the
    losses agree (``tests/test_official_training_parity.py`` checks the tolerance)."""
    out = run_script("bench_train_step.py", "--n-cells 50 --steps 1", tmp_path)
    difference = float(out.split("largest relative loss difference ")[1].split()[0])
    assert difference < 1e-4, out


def test_out_of_core_benchmark(tmp_path):
    """A backed file of 3,000 cells, embedded tissue by tissue with the int8 encoder."""
    args = "--n-cells 3000 --n-genes 200 --cells-per-slide 1500 --chunk 1000 --max-cells 300"
    args += f" --n-hidden 16 --n-layers 1 --n-latent 4 --precision int8 --path {tmp_path}/x.h5ad"
    out = run_script("bench_out_of_core.py", args, tmp_path)
    assert "z (3000, 4) float32 (finite: True)" in out, out
    assert "requirement < 4096 MB: met" in out, out


def test_packing_benchmark(tmp_path):
    args = "--cells 256 --tissue-size 32 --per-step 1,4 --epochs 2 --n-hidden 16 --n-layers 1"
    out = run_script("bench_packing.py", args, tmp_path)
    epochs = table(out, "Epoch time")
    assert [cells[1] for cells in epochs.values()] == ["8", "2"], epochs  # steps per epoch
    assert list(table(out, "Flow attention")) == ["4"]


@pytest.mark.slow
def test_corpus_benchmark(tmp_path):
    """One epoch of a 2-file corpus read by TissueCorpus: cold and warm tissue cache."""
    args = "--n-cells 2000 --n-files 2 --n-genes 200 --max-cells 200 --engines corpus"
    out = run_script("bench_corpus.py", f"{args} --dir {tmp_path}", tmp_path)
    rows = [line for line in out.splitlines() if line.startswith("| corpus |")]
    assert len(rows) == 3 and "error" not in out, out
