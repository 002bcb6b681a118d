"""Spatial gene imputation: a simulated 300-gene panel with the real PBMCs as reference.

``simulate_tissue(n_cells=3000)`` places thinned copies of the 700 real PBMCs on two slides.
A random panel of 300 genes (seeded) is "measured" in the spatial cells; the other genes are
held out (zeros in the input, truth kept). The original 700 PBMCs, with every gene, are the
scRNA-seq reference.

Methods, all scored on the held-out genes of the spatial cells:

- CellPLM trained jointly on spatial + reference cells with ``batch_key`` (spatial vs
  reference) and ``measured_genes_key`` (the loss of spatial cells uses the panel only);
  spatial cells grouped into contiguous tissues (``assign_tissues``), reference cells into
  random chunks; predictions from ``impute_genes`` (count scale, size factor from the panel).
- gimVI (``scvi.external.GIMVI``) on the reference and the 300-gene spatial AnnData;
  ``get_imputed_values(normalized=True)`` rescaled per cell by the same panel size factor.
- kNN mapping: the 10 nearest reference cells of each spatial cell in log1p-normalised panel
  space; their held-out-gene frequencies averaged, rescaled by the panel size factor.

CellPLM protocol (``imputation_eval``): per gene, over spatial cells, Pearson r and cosine of
log1p(prediction) (ReLU'd) vs log1p(truth), averaged over held-out genes (genes whose truth is
constant are skipped); RMSE per gene computed correctly (sqrt of the per-gene MSE) and averaged.

    python benchmarks/bench_imputation.py [--epochs 40] [--seed 0]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    QUIET_TRAIN,
    dense,
    log1p_cp10k,
    parser,
    per_gene_scores,
    print_table,
    setup,
    timer,
)


def panel_scale(pred: np.ndarray, observed: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Rescale each row of ``pred`` so its panel genes add up to the observed panel counts."""
    num = observed[:, measured].sum(1, keepdims=True)
    den = pred[:, measured].sum(1, keepdims=True)
    return pred * (num / np.where(den > 0, den, 1.0))


def main() -> None:
    p = parser(__doc__.splitlines()[0], epochs=40)
    p.add_argument("--n-cells", type=int, default=3000)
    p.add_argument("--n-panel", type=int, default=300)
    p.add_argument("--n-hidden", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-cells", type=int, default=500, help="cells per CellPLM tissue")
    p.add_argument("--gimvi-epochs", type=int, default=40)
    p.add_argument("--k", type=int, default=10, help="neighbours of the kNN mapping")
    args = p.parse_args()
    setup(args)

    import anndata as ad
    from scvi.external import GIMVI
    from sklearn.neighbors import NearestNeighbors

    import cellplm_scvi as cp
    from cellplm_scvi.pp import assign_tissues, random_chunks

    t_start = time.perf_counter()
    reference = cp.datasets.pbmc68k_counts()
    sim = cp.datasets.simulate_tissue(cells=reference, n_cells=args.n_cells, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    measured = np.zeros(sim.n_vars, dtype=bool)
    measured[rng.choice(sim.n_vars, args.n_panel, replace=False)] = True
    heldout = sim.var_names[~measured]
    truth = dense(sim.layers["counts"])
    observed = truth * measured[None, :]
    print(
        f"# data: {sim.n_obs} spatial cells ({sim.obs['slide'].nunique()} slides), "
        f"{reference.n_obs} reference cells, {sim.n_vars} genes: {measured.sum()} in the "
        f"panel, {len(heldout)} held out (seed {args.seed})"
    )
    results, times = [], {}

    # --- CellPLM, joint training with measured-gene masks
    with timer(times, "CellPLM"):
        assign_tissues(sim, spatial_key="spatial", library_key="slide", max_cells=args.max_cells)
        spatial = ad.AnnData(
            X=sp.csr_matrix(observed.astype(np.float32)),
            obs=pd.DataFrame(
                {"tech": "spatial", "tissue": "sp" + sim.obs["cellplm_tissue"].astype(str)},
                index=sim.obs_names,
            ),
            var=pd.DataFrame(index=sim.var_names),
        )
        ref = ad.AnnData(
            X=reference.layers["counts"].copy(),
            obs=pd.DataFrame(
                {
                    "tech": "reference",
                    "tissue": [
                        f"ref{c}" for c in random_chunks(np.zeros(reference.n_obs), 350, 0)
                    ],
                },
                index="ref_" + reference.obs_names,
            ),
            var=pd.DataFrame(index=reference.var_names),
        )
        joint = ad.concat([spatial, ref])
        joint.layers["counts"] = joint.X.copy()
        joint.varm["measured"] = pd.DataFrame({"spatial": measured}, index=joint.var_names)
        cp.CellPLM.setup_anndata(
            joint,
            layer="counts",
            batch_key="tech",
            tissue_key="tissue",
            measured_genes_key="measured",
        )
        model = cp.CellPLM(joint, n_hidden=args.n_hidden, n_layers=args.n_layers, n_latent=32)
        model.train(max_epochs=args.epochs, lr=args.lr, train_size=1.0, **QUIET_TRAIN)
        pred = model.impute_genes(list(heldout), indices=np.arange(sim.n_obs)).to_numpy()
    results.append((f"CellPLM ({args.epochs} ep)", pred, times["CellPLM"]))

    # --- gimVI
    with timer(times, "gimVI"):
        seq = reference.copy()
        st = ad.AnnData(
            X=sp.csr_matrix(observed[:, measured].astype(np.float32)),
            obs=pd.DataFrame(index=sim.obs_names),
            var=pd.DataFrame(index=sim.var_names[measured]),
        )
        st.layers["counts"] = st.X.copy()
        GIMVI.setup_anndata(seq, layer="counts")
        GIMVI.setup_anndata(st, layer="counts")
        gimvi = GIMVI(seq, st)
        gimvi.train(max_epochs=args.gimvi_epochs, **QUIET_TRAIN)
        _, imputed = gimvi.get_imputed_values(normalized=True)
        imputed = pd.DataFrame(imputed, columns=seq.var_names)[sim.var_names].to_numpy()
        pred = panel_scale(imputed, observed, measured)[:, ~measured]
    results.append((f"gimVI ({args.gimvi_epochs} ep)", pred, times["gimVI"]))

    # --- kNN mapping in the shared panel space
    with timer(times, "kNN"):
        ref_counts = dense(reference.layers["counts"])
        space_ref = log1p_cp10k(ref_counts[:, measured])
        space_sp = log1p_cp10k(observed[:, measured])
        nn = NearestNeighbors(n_neighbors=args.k).fit(space_ref)
        idx = nn.kneighbors(space_sp, return_distance=False)
        freq = ref_counts / ref_counts.sum(1, keepdims=True)
        pred = panel_scale(freq[idx].mean(1), observed, measured)[:, ~measured]
    results.append((f"kNN mapping (k={args.k})", pred, times["kNN"]))

    table = [
        {"method": name, **per_gene_scores(pred, truth[:, ~measured]), "time (s)": f"{t:.1f}"}
        for name, pred, t in results
    ]
    print_table(
        "Spatial imputation, held-out genes of the spatial cells (per-gene, log1p counts)",
        table,
        ["method", "Pearson", "cosine", "RMSE", "genes", "time (s)"],
    )
    print(
        f"\nCellPLM: n_hidden={args.n_hidden}, n_layers={args.n_layers}, n_latent=32, "
        f"lr={args.lr}, spatial tissues of <= {args.max_cells} cells, reference chunks of "
        f"350, train_size=1.0"
    )
    print(f"total wall time: {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
