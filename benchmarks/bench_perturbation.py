"""Genetic perturbation prediction on the simulated CRISPRi screen, against simple baselines.

Data: ``cp.datasets.simulate_perturbation()`` at its fixed defaults (seed 0: 24 perturbed genes,
36 doubles, 100 cells per perturbation, 500 controls), once per split seed (``--split-seeds``,
default 0 1 2): the cells stay the same, the Norman-style train/test partition changes.

Methods, each scored by ``cp.metrics.evaluate_perturbation`` on the test conditions:

- the four baselines of ``cp.metrics.perturbation_baselines``: no-change, train-mean,
  additive (doubles whose singles are both in training), linear (Ahlmann-Eltze et al.);
- CellPLM (``cellplm_prediction`` below), where the package has
  ``CellPLM.predict_perturbation``: from scratch, and loaded from a random-weight checkpoint in
  the official format (``cellplm_official_prediction``: the path of a pretrained release, whose
  weights are not available offline), each trained on the training conditions only;
- GEARS (``pip install cell-gears torch_geometric``), where it imports and finds its gene
  ontology file ``gene2go_all.pkl`` (downloaded from Harvard Dataverse at run time, so offline
  it must already be in ``--gears-data``); otherwise a printed line says why it was skipped.

Tables: Pearson of the predicted against the observed change from control (all genes, top-20
DE genes by observed change) and MSE (all genes, top-20), per method, for the unseen doubles
(both singles in training), the unseen singles and the doubles with an unseen gene: the mean
over the conditions of a split, then mean ± sd over the split seeds.

    python benchmarks/bench_perturbation.py [--split-seeds 0 1 2] [--epochs 50] [--small]
"""

from __future__ import annotations

import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import QUIET_TRAIN, log1p_cp10k, parser, print_table, setup

# --small: a screen that simulates and trains in seconds (the smoke run)
SMALL = {"n_perturbed_genes": 8, "n_doubles": 12, "cells_per_condition": 20}
SMALL["n_control_cells"] = 80
GROUPS = {
    "Unseen doubles (both singles in training)": "double_unseen",
    "Unseen singles": "single_unseen",
    "Doubles with an unseen gene": "double_unseen_gene",
}
METRICS = {
    "pearson_delta": "Pearson-delta all",
    "pearson_delta_top": "Pearson-delta top-20",
    "mse": "MSE all",
    "mse_top": "MSE top-20",
}


def test_conditions(adata) -> list[str]:
    """The test conditions in the order of the categories."""
    obs = adata.obs.drop_duplicates("condition")
    return [str(c) for c, s in zip(obs["condition"], obs["split"]) if s == "test"]


# ------------------------------------------------------------------------------ CellPLM
def cellplm_prediction(adata, split_seed: int, args):
    """CellPLM's prediction for the test conditions of ``adata``: an AnnData with one row per
    test condition (mean log1p CP10k), or ``None`` where the package has no perturbation model.

    CELLPLM ROWS: this is the one place where the model is set up, trained and asked.
    """
    import cellplm_scvi as cp

    if not hasattr(cp.CellPLM, "predict_perturbation"):
        print("# skipped CellPLM: this cellplm_scvi has no CellPLM.predict_perturbation")
        return None
    cp.CellPLM.setup_anndata(
        adata, layer="counts", perturbation_key="condition", control_category="ctrl"
    )
    model = cp.CellPLM(
        adata, n_hidden=args.n_hidden, n_layers=args.n_layers, n_latent=32, preset=args.preset
    )
    return _train_and_predict(model, adata, args)


def cellplm_official_prediction(adata, split_seed: int, args):
    """CellPLM loaded from a random-weight checkpoint in the official format (the path a real
    pretrained release takes: its gene-embedding table gives the unseen genes' embeddings;
    random weights carry no biology, so this row shows the path, not pretraining's value).

    The official vocabulary lacks 76 of the 765 genes: the model predicts the other 689, and
    normalises over them. So that the score is not that of the normalisation, this row is the
    observed control mean plus the model's predicted change (condition minus ``"ctrl"``, both
    predicted from the same control cells), and the observed control mean (no change) on the
    genes outside the vocabulary.
    """
    import anndata as ad

    import cellplm_scvi as cp
    from cellplm_scvi.metrics import condition_means

    if not hasattr(cp.CellPLM, "predict_perturbation"):
        return None
    prefix = Path(tempfile.mkdtemp(prefix="cellplm_random_")) / "random"
    cp.datasets.random_official_checkpoint(prefix, n_hidden=args.n_hidden, n_layers=args.n_layers)
    cp.CellPLM.setup_anndata(
        adata, layer="counts", perturbation_key="condition", control_category="ctrl"
    )
    model = cp.CellPLM.load_official(prefix, adata)
    conditions = test_conditions(adata)
    predicted = _train_and_predict(model, adata, args, [*conditions, "ctrl"])
    control = condition_means(adata, conditions=["ctrl"], layer="counts")
    values = np.repeat(control.X, len(conditions), axis=0)  # (K, all genes): no change
    columns = adata.var_names.get_indexer(predicted.var_names)
    change = predicted[conditions].X - predicted["ctrl"].X  # (K, genes of the vocabulary)
    values[:, columns] += change
    return ad.AnnData(values, obs=predicted[conditions].obs, var=control.var)


def _train_and_predict(model, adata, args, conditions=None):
    """Train on the cells of ``obs["split"] == "train"`` only, then predict ``conditions``
    (default: the test conditions; ``args.n_samples`` control cells each)."""
    model.train(
        max_epochs=args.epochs,
        lr=args.lr,
        batch_size=args.cells_per_step,
        datasplitter_kwargs={"split_key": "split"},  # test conditions never train
        **QUIET_TRAIN,
    )
    conditions = test_conditions(adata) if conditions is None else conditions
    return model.predict_perturbation(conditions, n_samples=args.n_samples)


# ------------------------------------------------------------------------------ GEARS
def gears_prediction(adata, split_seed: int, args):
    """GEARS trained on the training conditions (validation set = the training conditions, so
    no test information selects the epoch), or ``None`` with a printed reason."""
    try:
        from gears import PertData
    except ImportError as err:
        print(f"# skipped GEARS: not importable ({err}); pip install cell-gears torch_geometric")
        return None

    folder = Path(args.gears_data or tempfile.mkdtemp(prefix="gears_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        pert_data = PertData(str(folder), default_pert_graph=False)
    except Exception as err:  # the download of gene2go_all.pkl
        print(
            "# skipped GEARS: cannot load its gene ontology file gene2go_all.pkl (downloaded "
            f"from Harvard Dataverse at run time; offline, put it in --gears-data): "
            f"{type(err).__name__}: {str(err)[:160]}"
        )
        return None
    try:  # a third-party model failing must not lose the other rows
        return _run_gears(pert_data, folder, adata, split_seed, args)
    except Exception as err:
        print(f"# skipped GEARS: it failed: {type(err).__name__}: {str(err)[:200]}")
        return None


def _run_gears(pert_data, folder: Path, adata, split_seed: int, args):
    """Process the screen for GEARS, train it and predict the test conditions."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    from gears import GEARS

    # GEARS reads log-normalised X and predicts on that scale: log1p CP10k, as the metrics
    data = ad.AnnData(
        X=sp.csr_matrix(log1p_cp10k(adata.layers["counts"]).astype(np.float32)),
        obs=pd.DataFrame(
            {"condition": adata.obs["condition"].astype(str).to_numpy(), "cell_type": "sim"},
            index=adata.obs_names,
        ),
        var=pd.DataFrame({"gene_name": adata.var_names.to_numpy()}, index=adata.var_names),
    )
    name = f"sim_split{split_seed}"
    pert_data.new_data_process(dataset_name=name, adata=data)
    train = [c for c in pd.unique(data.obs["condition"]) if c not in set(test_conditions(adata))]
    split_file = folder / f"{name}_split.pkl"
    conditions = test_conditions(adata)
    with open(split_file, "wb") as fh:
        pickle.dump({"train": train, "val": train, "test": conditions}, fh)
    pert_data.prepare_split(split="custom", seed=split_seed, split_dict_path=str(split_file))
    pert_data.get_dataloader(batch_size=32, test_batch_size=128)
    model = GEARS(pert_data, device="cpu")
    model.model_initialize(hidden_size=64)
    model.train(epochs=args.gears_epochs)
    perturbations = [[g for g in c.split("+") if g != "ctrl"] for c in conditions]
    predicted = model.predict(perturbations)
    values = np.stack([predicted["_".join(p)] for p in perturbations])
    return ad.AnnData(
        X=values.astype(np.float32),
        obs=pd.DataFrame(index=conditions),
        var=pd.DataFrame(index=adata.var_names.copy()),
    )


# ------------------------------------------------------------------------------ main
def main() -> None:
    p = parser(__doc__.splitlines()[0], epochs=40)
    p.add_argument("--split-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--small", action="store_true", help="a tiny screen (smoke run)")
    p.add_argument("--n-hidden", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--preset",
        choices=["official", "dissociated"],
        default="official",
        help="CellPLM from scratch (official: the logged figures; dissociated: the default)",
    )
    p.add_argument("--cells-per-step", type=int, default=64, help="CellPLM target cells/step")
    p.add_argument("--n-samples", type=int, default=300, help="CellPLM cells per prediction")
    p.add_argument("--skip-cellplm", action="store_true")
    p.add_argument("--skip-gears", action="store_true")
    p.add_argument("--gears-epochs", type=int, default=20)
    p.add_argument("--gears-data", default=None, help="GEARS data folder (gene2go_all.pkl)")
    args = p.parse_args()
    setup(args)

    import pandas as pd

    import cellplm_scvi as cp
    from cellplm_scvi.metrics import evaluate_perturbation, summarize_perturbation

    sizes = SMALL if args.small else {}
    cells = cp.datasets.pbmc68k_counts()
    per_seed, times = [], {}
    for split_seed in args.split_seeds:
        adata = cp.datasets.simulate_perturbation(cells, split_seed=split_seed, **sizes)
        info = adata.uns["perturbation_simulation"]
        kinds = adata.obs.drop_duplicates("condition")["condition_type"].value_counts()
        print(
            f"# split seed {split_seed}: {adata.n_obs} cells x {adata.n_vars} genes; "
            f"{info['n_perturbed_genes']} perturbed genes, {info['n_doubles']} doubles; "
            + ", ".join(f"{k} {n}" for k, n in kinds.items() if n)
            + f"; held-out singles {', '.join(map(str, info['held_out_genes']))}"
        )
        predictions = {}
        methods = []
        if not args.skip_cellplm:
            methods.append(("CellPLM", cellplm_prediction))
            methods.append(("CellPLM (random official weights)", cellplm_official_prediction))
        if not args.skip_gears:
            methods.append(("GEARS", gears_prediction))
        for name, predict in methods:
            t0 = time.perf_counter()
            prediction = predict(adata, split_seed, args)
            if prediction is not None:
                predictions[name] = prediction
                times.setdefault(name, []).append(time.perf_counter() - t0)
        table = evaluate_perturbation(adata, predictions, layer="counts")
        interaction = adata.obs.drop_duplicates("condition").set_index("condition")["interaction"]
        table["interaction"] = table["condition"].map(interaction).astype(str).to_numpy()
        table["split_seed"] = split_seed
        per_seed.append(table)

    everything = pd.concat(per_seed, ignore_index=True)
    means = pd.concat(
        {seed: summarize_perturbation(t) for seed, t in zip(args.split_seeds, per_seed)},
        names=["split_seed"],
    )
    methods = list(pd.unique(everything["method"]))
    for title, kind in GROUPS.items():
        rows = []
        for method in methods:
            key = (method, kind)
            values = means.xs(key, level=("method", "condition_type"), drop_level=False)
            if values.empty:
                continue
            row = {"method": method, "conditions / seed": f"{values['n_conditions'].mean():.1f}"}
            for column, label in METRICS.items():
                row[label] = _mean_sd(values[column].to_numpy())
            rows.append(row)
        print_table(
            f"{title}, mean ± sd over {len(args.split_seeds)} split seeds",
            rows,
            ["method", *METRICS.values(), "conditions / seed"],
        )

    doubles = everything[everything["condition_type"] == "double_unseen"]
    rows = []
    for (method, interaction), group in doubles.groupby(["method", "interaction"], sort=False):
        rows.append(
            {
                "method, interaction": f"{method}, {interaction}",
                "Pearson-delta top-20": _mean_sd(group["pearson_delta_top"].to_numpy(), sd=False),
                "MSE top-20": _mean_sd(group["mse_top"].to_numpy(), sd=False),
                "conditions (all seeds)": len(group),
            }
        )
    print_table(
        "Unseen doubles by interaction type (conditions of all split seeds pooled)",
        rows,
        ["method, interaction", "Pearson-delta top-20", "MSE top-20", "conditions (all seeds)"],
    )
    for name, seconds in times.items():
        print(f"# {name}: {np.mean(seconds):.1f} s per split seed (train + predict)")


def _mean_sd(values: np.ndarray, sd: bool = True) -> str:
    """``mean ± sd`` of the finite values (``n/a`` if none)."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return "n/a"
    if not sd:
        return f"{values.mean():.3f}"
    return f"{values.mean():.3f} ± {values.std(ddof=1) if values.size > 1 else 0.0:.3f}"


if __name__ == "__main__":
    main()
