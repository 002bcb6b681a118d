"""Defaults a new user gets: the README "Use" block without ``max_epochs``, next to SCVI/SCANVI.

The README block (``assign_tissues(max_cells=1000)``, ``setup_anndata``, ``CellPLM(adata)``,
``train()``) runs as written, only without ``max_epochs`` (the default length,
docs/user_guide.md "Training length"); on ``pbmc68k`` (no coordinates) its setup is
``setup_anndata(adata, layer="counts")``. Next to it, ``scvi.model.SCVI(adata).train()`` and
``SCANVI.from_scvi_model(vae, "Unknown").train()`` with no arguments (scvi-tools' defaults).

Rows (``--data``: ``pbmc68k``, scanpy's 700 PBMCs via ``cp.datasets.pbmc68k_counts()``, or
``sim``, ``cp.datasets.simulate_tissue(n_cells=--n-cells)``, the quickstart's data):

- cell-type F1: :func:`cellplm_scvi.metrics.linear_probe` (5-fold macro-F1) on the latent;
- niche F1 (``sim``): the same probe on ``obs["niche"]``, CellPLM's cell + niche read-out
  (``representation="both"``), SCVI's latent;
- DE overlap: mean over cell types of the top-20 up-regulated genes of
  ``differential_expression(groupby="cell_type", mode="change")`` shared with scanpy's Wilcoxon
  top-20, ranked as in ``bench_de.py``;
- annotation macro-F1: ``predict()`` on the 40% of a stratified 60/40 split whose labels are
  hidden (``"Unknown"``), for a CellPLM set up with ``labels_key`` (otherwise the same block)
  and for SCANVI from an SCVI of the same split;
- training time, wall and CPU seconds of the process (one thread: the CPU time is what the fit
  costs, whatever else loads the machine), with the load average before each fit (SCVI fits
  first, then CellPLM, back to back), and the CPU-time ratio CellPLM / SCVI (annotation:
  CellPLM / (SCVI + SCANVI));
- convergence of the default length: CellPLM's validation ELBO (``elbo_validation``, checked
  about 20 times) over the last 10% of its steps, ``|ELBO(end) - ELBO(90%)| / |ELBO(end)|``.

    python benchmarks/bench_defaults.py --data pbmc68k [--threads 1] [--seed 0]
    python benchmarks/bench_defaults.py --data sim --n-cells 6000

``--max-epochs``/``--scvi-max-epochs``, the architecture options and ``--de-samples``
(scvi-tools' default 5,000) replace the defaults (smoke runs only).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import QUIET_TRAIN, print_table, setup
from bench_de import DE_SAMPLES_HELP, overlaps, wilcoxon_top

UNKNOWN = "Unknown"
N_VALIDATIONS = 20  # validation checks over a CellPLM run (convergence)


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def relative_change(elbo: np.ndarray, epochs: np.ndarray, max_epochs: int) -> float:
    """``|ELBO(end) - ELBO(90%)| / |ELBO(end)|``, the validation ELBO nearest to 90% of the run."""
    at_90 = int(np.argmin(np.abs(epochs - 0.9 * (max_epochs - 1))))
    return float(abs(elbo[-1] - elbo[at_90]) / abs(elbo[-1]))


def read_data(args):
    import cellplm_scvi as cp

    if args.data == "pbmc68k":
        return cp.datasets.pbmc68k_counts()
    return cp.datasets.simulate_tissue(n_cells=args.n_cells, seed=args.seed)


def setup_cellplm(adata, labels_key: str | None = None) -> None:
    """The README block's set-up (without coordinates: ``setup_anndata(layer="counts")``)."""
    import cellplm_scvi as cp

    if "spatial" not in adata.obsm:
        cp.CellPLM.setup_anndata(adata, layer="counts", labels_key=labels_key)
        return
    cp.pp.assign_tissues(adata, spatial_key="spatial", library_key="slide", max_cells=1000)
    cp.CellPLM.setup_anndata(
        adata,
        layer="counts",
        spatial_key="spatial",
        tissue_key="cellplm_tissue",
        labels_key=labels_key,
    )


def fit(model, times: dict, name: str, **kwargs) -> None:
    """Train; keep (wall s, CPU s of this process, load average before)."""
    loads = load()
    start, cpu = time.perf_counter(), time.process_time()
    model.train(**kwargs, **QUIET_TRAIN)
    times[name] = (time.perf_counter() - start, time.process_time() - cpu, loads)
    print(f"# {name} trained: {times[name][0]:.0f} s wall, {times[name][1]:.0f} s CPU", flush=True)


def main() -> None:
    import argparse

    from _common import add_common_options

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=["pbmc68k", "sim"], default="pbmc68k")
    p.add_argument("--n-cells", type=int, default=6000, help="cells of --data sim")
    p.add_argument("--max-epochs", type=int, default=None, help="CellPLM (default: its own)")
    p.add_argument("--scvi-max-epochs", type=int, default=None, help="SCVI and SCANVI")
    p.add_argument("--n-hidden", type=int, default=None, help="CellPLM (default: its own)")
    p.add_argument("--n-layers", type=int, default=None)
    p.add_argument("--skip-annotation", action="store_true")
    p.add_argument("--de-samples", type=int, default=5000, help=DE_SAMPLES_HELP)
    add_common_options(p)
    args = p.parse_args()
    setup(args)

    import scvi
    from sklearn.model_selection import train_test_split

    import cellplm_scvi as cp
    from cellplm_scvi._constants import TISSUE_KEY
    from cellplm_scvi.metrics import linear_probe
    from cellplm_scvi.model._training import default_train_steps, tissue_steps

    arch = {k: v for k, v in (("n_hidden", args.n_hidden), ("n_layers", args.n_layers)) if v}
    adata = read_data(args)
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    has_niches = "niche" in adata.obs
    reference = wilcoxon_top(adata, "cell_type", 20)
    n_tissue_cells = "whole sample" if not has_niches else "tissues of <= 1000 cells"
    print(f"# data: {args.data}, {adata.n_obs} cells x {adata.n_vars} genes ({n_tissue_cells})")
    train, test = train_test_split(
        np.arange(adata.n_obs), test_size=0.4, stratify=truth, random_state=args.seed
    )
    hidden = truth.copy()
    hidden[test] = UNKNOWN
    times, scores, notes = {}, {}, {}

    def score(name, latent, niche_features, de) -> None:
        scores[name] = {
            "cell-type F1": linear_probe(latent, truth, seed=args.seed),
            "niche F1": (
                linear_probe(niche_features, adata.obs["niche"], seed=args.seed)
                if has_niches
                else np.nan
            ),
            "DE overlap": float(np.mean(list(overlaps(de, reference, 20).values()))),
        }
        print(f"# {name}: {scores[name]}", flush=True)

    # SCVI at its defaults (labels registered for SCANVI; SCVI does not read them), then CellPLM
    scvi.settings.seed = args.seed
    sc_adata = adata.copy()
    sc_adata.obs["label"] = hidden
    scvi.model.SCVI.setup_anndata(sc_adata, layer="counts", labels_key="label")
    vae = scvi.model.SCVI(sc_adata)
    scvi_epochs = {} if args.scvi_max_epochs is None else {"max_epochs": args.scvi_max_epochs}
    fit(vae, times, "SCVI", **scvi_epochs)
    latent = vae.get_latent_representation()
    de = vae.differential_expression(
        groupby="cell_type", mode="change", silent=True, n_samples_overall=args.de_samples
    )
    score("SCVI", latent, latent, de)

    scvi.settings.seed = args.seed
    cp_adata = adata.copy()
    setup_cellplm(cp_adata)
    model = cp.CellPLM(cp_adata, **arch)
    n_tissues = cp_adata.obs["cellplm_tissue"].nunique()
    epochs = {} if args.max_epochs is None else {"max_epochs": args.max_epochs}
    codes = model.adata_manager.get_from_registry(TISSUE_KEY)
    cells_per_step, per_epoch = tissue_steps(codes, batch_size=4000)  # train()'s default
    steps = default_train_steps(cp_adata.n_obs, cells_per_step)
    expected = args.max_epochs or math.ceil(steps / per_epoch)  # for the validation interval
    every = max(1, expected // N_VALIDATIONS)
    fit(model, times, "CellPLM", check_val_every_n_epoch=every, **epochs)
    max_epochs = model.trainer.max_epochs
    elbo = model.history["elbo_validation"]
    change = relative_change(elbo.iloc[:, 0].to_numpy(), elbo.index.to_numpy(), max_epochs)
    notes["CellPLM"] = (
        f"preset {model.preset!r}, lr {model.trainer.lightning_module.lr:g}: "
        f"{max_epochs} epochs x {n_tissues} tissues = {model.trainer.global_step} steps, "
        f"{cells_per_step:.0f} cells a step; validation ELBO {elbo.iloc[-1, 0]:.1f}, "
        f"{100 * change:.2f}% change over the last 10% of steps"
    )
    latent = model.get_latent_representation()
    niche = model.get_latent_representation(representation="both") if has_niches else None
    de = model.differential_expression(
        groupby="cell_type", mode="change", silent=True, n_samples_overall=args.de_samples
    )
    score("CellPLM", latent, niche, de)

    if not args.skip_annotation:
        scvi.settings.seed = args.seed
        scanvi = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=UNKNOWN)
        fit(scanvi, times, "SCANVI", **scvi_epochs)
        pred = np.asarray(scanvi.predict(), dtype=str)
        from sklearn.metrics import f1_score

        scores["SCVI"]["annotation F1"] = f1_score(truth[test], pred[test], average="macro")
        scvi.settings.seed = args.seed
        labelled = adata.copy()
        labelled.obs["label"] = hidden
        setup_cellplm(labelled, labels_key="label")
        annotator = cp.CellPLM(labelled, **arch)
        fit(annotator, times, "CellPLM annotation", **epochs)
        pred = np.asarray(annotator.predict(), dtype=str)
        scores["CellPLM"]["annotation F1"] = f1_score(truth[test], pred[test], average="macro")

    rows = []
    for name in ("CellPLM", "SCVI"):
        wall, cpu, loads = times[name]
        rows.append(
            {
                "method": name,
                **{k: f"{v:.3f}" for k, v in scores[name].items()},
                "train wall / CPU (s)": f"{wall:.0f} / {cpu:.0f}",
                "load before": loads,
                "CPU time / SCVI": f"{cpu / times['SCVI'][1]:.2f}",
            }
        )
    if not args.skip_annotation:
        ours = times["CellPLM annotation"]
        theirs = [a + b for a, b in zip(times["SCVI"][:2], times["SCANVI"][:2])]
        rows.append(
            {
                "method": "annotation: CellPLM with labels vs SCVI + SCANVI",
                "train wall / CPU (s)": f"{ours[0]:.0f} / {ours[1]:.0f} vs "
                f"{theirs[0]:.0f} / {theirs[1]:.0f}",
                "load before": f"{ours[2]} vs {times['SCANVI'][2]}",
                "CPU time / SCVI": f"{ours[1] / theirs[1]:.2f}",
            }
        )
    columns = ["method", "cell-type F1", "niche F1", "DE overlap", "annotation F1"]
    print_table(
        f"Defaults on {args.data} ({adata.n_obs} cells)",
        rows,
        [*columns, "train wall / CPU (s)", "load before", "CPU time / SCVI"],
    )
    for name, note in notes.items():
        print(f"# {name}: {note}")
    print(f"# SCVI: {vae.trainer.max_epochs} epochs (scvi-tools' defaults), load at end {load()}")


if __name__ == "__main__":
    main()
