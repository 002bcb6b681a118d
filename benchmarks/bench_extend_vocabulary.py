"""Genes outside the pretrained vocabulary: imputation after ``extend_vocabulary``.

The 700 real PBMCs (``pbmc68k_counts``) have genes that the 19,374-gene official vocabulary
lacks: symbols of an older annotation that GENCODE v44 no longer has (e.g. ``ATPIF1``), and
``--rename`` further genes renamed to symbols outside it (``NEW_<symbol>``), all with their real
counts. These are the *new* genes. The cells are split at random (seeded): ``--query-fraction``
of them are the query, whose new genes are held out (zero counts, marked unmeasured with
``measured_genes_key``); the others are the reference, which measures every gene.

A random official-format checkpoint (``random_official_checkpoint``: no real weights offline)
is loaded with the official imputation settings (``IMPUTATION_OVERRIDES``), its vocabulary
extended or not, and fine-tuned on reference + query. Methods, scored on the new genes of the
query cells (per gene over cells, the CellPLM ``imputation_eval`` protocol: Pearson r and
cosine of log1p counts, RMSE of log1p):

- CellPLM extended (``load_official(..., extend_vocabulary=True)``), every parameter trained;
- CellPLM extended, the new rows only (``extend_vocabulary(train_new_genes_only=True)``);
- CellPLM not extended: cannot predict the new genes at all (``impute_genes`` raises);
- reference mean x library: each new gene's mean share of the old genes' counts in the
  reference cells, times the query cell's count of old genes;
- reference mean: each new gene's mean count in the reference cells (a constant per gene, so
  its Pearson r is undefined; its cosine and RMSE are shown).

    python benchmarks/bench_extend_vocabulary.py [--epochs 30] [--seed 0]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from _common import QUIET_TRAIN, dense, parser, per_gene_scores, print_table, setup, timer


def main() -> None:
    p = parser(__doc__.splitlines()[0], epochs=30)
    p.add_argument("--rename", type=int, default=20, help="vocabulary genes renamed as new")
    p.add_argument("--query-fraction", type=float, default=1 / 3)
    p.add_argument("--n-hidden", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-cells", type=int, default=100, help="cells per CellPLM tissue")
    args = p.parse_args()
    setup(args)

    import cellplm_scvi as cp
    from cellplm_scvi._genes import align_genes, official_config
    from cellplm_scvi.datasets import random_official_checkpoint
    from cellplm_scvi.model import IMPUTATION_OVERRIDES

    t_start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    adata = cp.datasets.pbmc68k_counts()
    vocabulary = official_config()["gene_list"]
    matched = align_genes(list(adata.var_names), vocabulary).input_index
    renamed = rng.choice(matched, args.rename, replace=False)
    names = adata.var_names.to_numpy(dtype=object).copy()
    names[renamed] = ["NEW_" + g for g in names[renamed]]
    adata.var_names = names
    is_new = np.ones(adata.n_vars, dtype=bool)
    is_new[align_genes(list(adata.var_names), vocabulary).input_index] = False
    new_genes = list(adata.var_names[is_new])

    query = np.zeros(adata.n_obs, dtype=bool)
    query[rng.choice(adata.n_obs, round(args.query_fraction * adata.n_obs), replace=False)] = True
    truth = dense(adata.layers["counts"])
    counts = adata.layers["counts"].tolil()
    counts[np.ix_(np.flatnonzero(query), np.flatnonzero(is_new))] = 0  # held out
    adata.layers["counts"] = counts.tocsr()
    adata.X = adata.layers["counts"].copy()
    adata.obs["tech"] = np.where(query, "query", "reference")
    adata.varm["measured"] = pd.DataFrame({"query": ~is_new}, index=adata.var_names)
    n_native = int(is_new.sum()) - args.rename
    print(
        f"# data: {adata.n_obs} PBMCs ({query.sum()} query, {(~query).sum()} reference), "
        f"{adata.n_vars} genes, {is_new.sum()} outside the vocabulary ({n_native} of them "
        f"natively, {args.rename} renamed), held out in the query; their share of "
        f"the reference counts {truth[~query][:, is_new].sum() / truth[~query].sum():.1%}"
    )
    cp.CellPLM.setup_anndata(
        adata,
        layer="counts",
        batch_key="tech",
        max_cells=args.max_cells,
        measured_genes_key="measured",
    )
    print(
        f"# checkpoint: official format, RANDOM weights (n_hidden {args.n_hidden}, "
        f"{args.n_layers} layers; no real weights offline)"
    )
    prefix = Path(tempfile.mkdtemp()) / "random"
    random_official_checkpoint(
        prefix, n_hidden=args.n_hidden, n_layers=args.n_layers, seed=args.seed
    )
    fit = {"max_epochs": args.epochs, "lr": args.lr, "train_size": 1.0, **QUIET_TRAIN}
    target = truth[query][:, is_new]
    rows, times = [], {}

    def score(name: str, pred: np.ndarray | None, seconds: float, note: str = "") -> None:
        row = {"method": name, "time (s)": f"{seconds:.1f}", "note": note}
        if pred is None:
            rows.append({**row, "Pearson": "n/a", "cosine": "n/a", "RMSE": "n/a"})
            return
        scores = per_gene_scores(pred, target)
        if np.ptp(pred, axis=0).max() == 0:  # the same value in every cell: no correlation
            scores.update(Pearson="undefined", genes="")
        rows.append({**row, **scores})

    def impute(model) -> np.ndarray:
        return model.impute_genes(new_genes, indices=np.flatnonzero(query)).to_numpy()

    for name, only_new in (("all parameters", False), ("new rows only", True)):
        key = f"CellPLM extended, {name} ({args.epochs} ep)"
        with timer(times, key):
            model = cp.CellPLM.load_official(prefix, adata, **IMPUTATION_OVERRIDES)
            model = model.extend_vocabulary(train_new_genes_only=only_new)
            model.train(**fit)
            pred = impute(model)
        score(key, pred, times[key])

    key = f"CellPLM not extended ({args.epochs} ep)"
    with timer(times, key):
        model = cp.CellPLM.load_official(prefix, adata, **IMPUTATION_OVERRIDES)
        model.train(**fit)
        try:
            impute(model)
            note = "predicted?!"
        except KeyError:
            note = "cannot predict: genes outside the vocabulary are dropped (KeyError)"
    score(key, None, times[key], note)

    with timer(times, "mean"):
        old = truth[:, ~is_new].sum(1, keepdims=True)
        ref = ~query
        share = (truth[ref][:, is_new] / np.maximum(old[ref], 1)).mean(0, keepdims=True)
        by_library = share * old[query]
        constant = np.broadcast_to(truth[ref][:, is_new].mean(0, keepdims=True), target.shape)
    score("reference mean x library", by_library, times["mean"])
    score("reference mean (constant per gene)", np.array(constant), times["mean"])

    print_table(
        f"Imputation of {len(new_genes)} genes outside the vocabulary ({query.sum()} query cells)",
        rows,
        ["method", "Pearson", "cosine", "RMSE", "genes", "time (s)", "note"],
    )
    print(f"\n# total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
