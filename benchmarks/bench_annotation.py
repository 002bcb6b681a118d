"""Cell-type annotation on the 700 real PBMCs (scanpy's pbmc68k_reduced, recovered counts).

Stratified 70/30 split. CellPLM is trained from scratch with the labels of the training cells
(test labels hidden as "Unknown"; the test cells still enter training unlabelled, the
transductive set-up of the official pipeline). Baselines on the same split: logistic
regression on 50 PCs of log1p CP10k (PCA fitted on the training cells), and scANVI (scVI
pretraining, then ``SCANVI.from_scvi_model`` with the same hidden labels).

Metrics on the test cells: macro-F1 and balanced accuracy (= the official "acc", which is
macro-averaged).

    python benchmarks/bench_annotation.py [--epochs 100] [--seed 0]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import QUIET_TRAIN, log1p_cp10k, parser, pca, print_table, setup, timer

UNKNOWN = "Unknown"


def scores(truth, pred) -> dict:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    return {
        "macro-F1": f1_score(truth, pred, average="macro"),
        "balanced acc": balanced_accuracy_score(truth, pred),
        "accuracy": accuracy_score(truth, pred),
    }


def main() -> None:
    p = parser(__doc__.splitlines()[0], epochs=100)
    p.add_argument("--n-hidden", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-cells", type=int, default=200, help="cells per CellPLM tissue")
    p.add_argument("--scvi-epochs", type=int, default=200)
    p.add_argument("--scanvi-epochs", type=int, default=50)
    args = p.parse_args()
    setup(args)

    import scvi
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    import cellplm_scvi as cp

    t_start = time.perf_counter()
    adata = cp.datasets.pbmc68k_counts()
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    train, test = train_test_split(
        np.arange(adata.n_obs), test_size=0.3, stratify=truth, random_state=args.seed
    )
    is_test = np.zeros(adata.n_obs, dtype=bool)
    is_test[test] = True
    adata.obs["label"] = np.where(is_test, UNKNOWN, truth)
    print(
        f"# data: {adata.n_obs} cells x {adata.n_vars} genes, {len(set(truth))} types; "
        f"train {len(train)}, test {len(test)} (stratified, seed {args.seed})"
    )
    rows, times = [], {}

    # --- CellPLM from scratch with labels
    with timer(times, "CellPLM"):
        cp.CellPLM.setup_anndata(
            adata, layer="counts", labels_key="label", max_cells=args.max_cells
        )
        model = cp.CellPLM(
            adata, n_hidden=args.n_hidden, n_layers=args.n_layers, n_latent=32, preset="official"
        )
        model.train(max_epochs=args.epochs, lr=args.lr, train_size=1.0, **QUIET_TRAIN)
        pred = model.predict()
    rows.append(
        {
            "method": f"CellPLM ({args.epochs} ep)",
            **scores(truth[test], pred[test]),
            "time (s)": f"{times['CellPLM']:.1f}",
        }
    )

    # --- logistic regression on PCA
    with timer(times, "PCA+LR"):
        x = pca(log1p_cp10k(adata.layers["counts"]), 50, args.seed, fit_rows=train)
        clf = LogisticRegression(max_iter=5000)
        clf.fit(x[train], truth[train])
        pred = clf.predict(x[test])
    rows.append(
        {
            "method": "PCA(50) + LogReg",
            **scores(truth[test], pred),
            "time (s)": f"{times['PCA+LR']:.1f}",
        }
    )

    # --- scANVI
    with timer(times, "scANVI"):
        sc_adata = adata.copy()
        scvi.model.SCVI.setup_anndata(sc_adata, layer="counts", labels_key="label")
        vae = scvi.model.SCVI(sc_adata, n_latent=10)
        vae.train(max_epochs=args.scvi_epochs, **QUIET_TRAIN)
        scanvi = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=UNKNOWN)
        scanvi.train(max_epochs=args.scanvi_epochs, **QUIET_TRAIN)
        pred = np.asarray(scanvi.predict(), dtype=str)
    rows.append(
        {
            "method": f"scANVI ({args.scvi_epochs}+{args.scanvi_epochs} ep)",
            **scores(truth[test], pred[test]),
            "time (s)": f"{times['scANVI']:.1f}",
        }
    )

    print_table(
        "Annotation, pbmc68k_reduced test cells (30%)",
        rows,
        ["method", "macro-F1", "balanced acc", "accuracy", "time (s)"],
    )
    print(
        f"\nCellPLM: n_hidden={args.n_hidden}, n_layers={args.n_layers}, n_latent=32, "
        f"lr={args.lr}, tissues of <= {args.max_cells} cells, train_size=1.0"
    )
    print(f"total wall time: {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
