"""Differential expression on the 700 real PBMCs: CellPLM and scVI against scanpy's Wilcoxon.

For every cell type, ``differential_expression(groupby="cell_type", mode="change")`` (one
cell type against the rest) gives the model's top-20 up-regulated genes; they are compared
with the top-20 of ``sc.tl.rank_genes_groups(method="wilcoxon")`` on ``normalize_total`` +
``log1p`` counts (the markers a biologist would pick).

Ranking rule, the same for both models: the genes with ``lfc_mean > 0``, sorted by
``proba_de`` (the order scvi-tools returns for ``mode="change"``), ties broken by
``lfc_mean``, first 20. The mean overlap is reported over all 10 cell types and over the 9
with at least ``--min-cells`` cells (the 8-cell "CD4+/CD45RA+/CD25- Naive T" is the one left
out).

Null test: two random halves of one cell type, compared with ``idx1``/``idx2``; the number
of genes with ``is_de_fdr_0.05`` should be (close to) zero.

    python benchmarks/bench_de.py [--epochs 100] [--scvi-epochs 100] [--seed 0]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from _common import QUIET_TRAIN, parser, print_table, setup, timer

FDR_COLUMN = "is_de_fdr_0.05"
DE_SAMPLES_HELP = "posterior samples per DE comparison (n_samples_overall; smoke runs lower it)"


def wilcoxon_top(adata, groupby: str, n_top: int) -> dict[str, list[str]]:
    """Top ``n_top`` genes per group of scanpy's Wilcoxon test on log-normalised counts."""
    import scanpy as sc

    lognorm = adata.copy()
    lognorm.X = adata.layers["counts"].copy()
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    sc.tl.rank_genes_groups(lognorm, groupby, method="wilcoxon", n_genes=n_top)
    names = pd.DataFrame(lognorm.uns["rank_genes_groups"]["names"])
    return {group: list(names[group]) for group in names.columns}


def model_top(de: pd.DataFrame, group: str, n_top: int) -> list[str]:
    """Top ``n_top`` up-regulated genes of ``group`` (vs rest) in a ``mode="change"`` table:
    ``lfc_mean > 0``, by ``proba_de`` then ``lfc_mean``, both descending."""
    table = de[de["group1"] == group]
    up = table[table["lfc_mean"] > 0]
    ranked = up.sort_values(["proba_de", "lfc_mean"], ascending=False, kind="mergesort")
    return list(ranked.index[:n_top])


def overlaps(de: pd.DataFrame, reference: dict[str, list[str]], n_top: int) -> dict[str, int]:
    return {g: len(set(model_top(de, g, n_top)) & set(ref)) for g, ref in reference.items()}


def null_counts(
    model, adata, groups: list[str], seed: int, n_samples: int = 5000
) -> dict[str, int]:
    """Genes at FDR 0.05 between two random halves of each of ``groups`` (``n_samples``
    posterior samples per comparison)."""
    rng = np.random.default_rng(seed)
    counts = {}
    for group in groups:
        cells = rng.permutation(np.flatnonzero(adata.obs["cell_type"].to_numpy() == group))
        half = len(cells) // 2
        de = model.differential_expression(
            adata,
            idx1=cells[:half],
            idx2=cells[half:],
            mode="change",
            silent=True,
            n_samples_overall=n_samples,
        )
        counts[group] = int(de[FDR_COLUMN].sum())
    return counts


def main() -> None:
    p = parser(__doc__.splitlines()[0], epochs=100)
    p.add_argument("--scvi-epochs", type=int, default=100)
    p.add_argument("--n-hidden", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-latent", type=int, default=32)
    p.add_argument("--latent", choices=["gmvae", "vae"], default="gmvae")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--mask-cell-rate", type=float, default=0.75)
    p.add_argument("--mask-gene-rate", type=float, default=0.25)
    p.add_argument(
        "--max-cells", type=int, default=None, help="cells per CellPLM tissue (default: all 700)"
    )
    p.add_argument("--n-top", type=int, default=20)
    p.add_argument("--min-cells", type=int, default=10, help="cell types kept in the 2nd mean")
    p.add_argument("--null-groups", type=int, default=3, help="largest cell types, null test")
    p.add_argument("--skip-scvi", action="store_true")
    p.add_argument("--de-samples", type=int, default=5000, help=DE_SAMPLES_HELP)
    args = p.parse_args()
    setup(args)

    import scvi

    import cellplm_scvi as cp

    t_start = time.perf_counter()
    adata = cp.datasets.pbmc68k_counts()
    sizes = adata.obs["cell_type"].value_counts()
    reference = wilcoxon_top(adata, "cell_type", args.n_top)
    big = [g for g in sizes.index if sizes[g] >= args.min_cells]
    null_groups = list(sizes.index[: args.null_groups])
    print(f"# data: {adata.n_obs} cells x {adata.n_vars} genes, {len(sizes)} cell types")
    times, results = {}, {}

    cp_adata = adata.copy()
    cp.CellPLM.setup_anndata(cp_adata, layer="counts", max_cells=args.max_cells)
    model = cp.CellPLM(
        cp_adata,
        n_hidden=args.n_hidden,
        n_layers=args.n_layers,
        n_latent=args.n_latent,
        latent=args.latent,
        mask_cell_rate=args.mask_cell_rate,
        mask_gene_rate=args.mask_gene_rate,
    )
    with timer(times, "CellPLM train"):
        model.train(max_epochs=args.epochs, lr=args.lr, train_size=1.0, **QUIET_TRAIN)
    with timer(times, "CellPLM DE"):
        de = model.differential_expression(
            groupby="cell_type", mode="change", silent=True, n_samples_overall=args.de_samples
        )
    with timer(times, "CellPLM null"):
        null = null_counts(model, cp_adata, null_groups, args.seed, args.de_samples)
    results["CellPLM"] = (overlaps(de, reference, args.n_top), null)

    if not args.skip_scvi:
        sc_adata = adata.copy()
        scvi.model.SCVI.setup_anndata(sc_adata, layer="counts")
        vae = scvi.model.SCVI(sc_adata)
        with timer(times, "scVI train"):
            vae.train(max_epochs=args.scvi_epochs, **QUIET_TRAIN)
        with timer(times, "scVI DE"):
            de = vae.differential_expression(
                groupby="cell_type", mode="change", silent=True, n_samples_overall=args.de_samples
            )
        with timer(times, "scVI null"):
            null = null_counts(vae, sc_adata, null_groups, args.seed, args.de_samples)
        results["scVI"] = (overlaps(de, reference, args.n_top), null)

    methods = list(results)
    rows = [
        {"cell type": g, "cells": int(sizes[g]), **{m: results[m][0][g] for m in methods}}
        for g in sizes.index
    ]
    summaries = {
        f"all {len(sizes)}": list(sizes.index),
        f"{len(big)} with >= {args.min_cells} cells": big,
    }
    for label, groups in summaries.items():
        per_method = {m: [results[m][0][g] for g in groups] for m in methods}
        rows.append(
            {
                "cell type": f"mean, {label}",
                **{m: f"{np.mean(v):.2f}" for m, v in per_method.items()},
            }
        )
        rows.append(
            {
                "cell type": f"range, {label}",
                **{m: f"{min(v)}-{max(v)}" for m, v in per_method.items()},
            }
        )
    print_table(
        f"Overlap of the top-{args.n_top} up-regulated genes (mode='change', vs rest) with "
        f"scanpy's Wilcoxon top-{args.n_top}",
        rows,
        ["cell type", "cells", *methods],
    )
    null_rows = [
        {"cell type": g, "cells": int(sizes[g]), **{m: results[m][1][g] for m in methods}}
        for g in null_groups
    ]
    print_table(
        f"Null test: genes with {FDR_COLUMN} between two random halves of one cell type "
        f"(of {adata.n_vars} genes)",
        null_rows,
        ["cell type", "cells", *methods],
    )
    print_table(
        "Wall time (s)",
        [{"step": k, "s": f"{v:.1f}"} for k, v in times.items()],
        ["step", "s"],
    )
    print(
        f"\nCellPLM: n_hidden={args.n_hidden}, n_layers={args.n_layers}, "
        f"n_latent={args.n_latent}, latent={args.latent}, lr={args.lr}, epochs={args.epochs}, "
        f"mask rates {args.mask_cell_rate}/{args.mask_gene_rate}, tissues: "
        f"{'whole sample' if args.max_cells is None else f'<= {args.max_cells} cells'}; "
        f"scVI: defaults, {args.scvi_epochs} epochs"
    )
    print(f"total wall time: {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
