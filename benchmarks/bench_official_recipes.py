"""Official CellPLM pipelines vs our recipes, side by side.

``--task annotation`` (default): ``CellTypeAnnotationPipeline`` vs ``annotation_recipe``. Both
fine-tune the same random small official checkpoint (written in the official format, the
genes of pbmc68k as Ensembl IDs) on the same data and split (pbmc68k_reduced, 60/20/20 per
cell, stratified) for the same epochs, on the CPU, offline. Prints the test macro-F1.

``--task imputation``: ``ImputationPipeline`` vs ``imputation_recipe``. A simulated panel: the
700 real PBMCs (all genes) are the scRNA-seq reference, ``simulate_tissue`` cells (simulated
once, from ``--seed``) are the spatial query, which measured a random panel of ``--n-panel``
genes (drawn per row seed, like the split and the weights); the other genes
are hidden (zeros in the input, truth kept). Forward-pass groups are the same on both sides
(official ``batch`` = our ``tissue``: spatial tissues of contiguous cells, random reference
chunks); whole groups are train or valid (20%, seeded). Both fine-tune the same random
official checkpoint (``random_official_checkpoint``, VAE latent) for the same epochs.
Prints the per-gene Pearson (``_common.per_gene_scores``, the official
``imputation_eval`` on log1p counts) over the hidden genes of the spatial cells: official
``predict``, ours with ``library="all"`` (the official read-out) and ``library="measured"``
(our default).

Both print the wall time of each side for every seed, and mean +- sd over seeds (the
run-to-run noise).

    python benchmarks/bench_official_recipes.py --task imputation --seeds 5 --epochs 30 \
        --threads 1 --rerun-official
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import official_genes, parser, per_gene_scores, print_table, setup


def ensembl_pbmc68k():
    """pbmc68k counts in ``X``, the genes renamed to the Ensembl IDs of the official
    vocabulary (genes outside it dropped)."""
    import cellplm_scvi as cp
    from cellplm_scvi._genes import to_ensembl

    adata = cp.datasets.pbmc68k_counts()
    adata.X = adata.layers["counts"].copy()
    ensembl = np.asarray(to_ensembl(adata.var_names), dtype=object)
    vocabulary = set(official_genes())
    keep = np.array([g in vocabulary for g in ensembl])
    adata = adata[:, keep].copy()
    adata.var_names = list(ensembl[keep])
    adata.var_names_make_unique()
    return adata


def print_summary(title: str, rows: list[dict], columns: list[str]) -> None:
    """The per-seed rows, then their mean and sd (ddof=1) per column."""
    summary = {"seed": "mean"} | {c: float(np.mean([r[c] for r in rows])) for c in columns}
    spread = {"seed": "sd"} | {c: float(np.std([r[c] for r in rows], ddof=1)) for c in columns}
    print_table(title, [*rows, summary, spread], ["seed", *columns])


def small_config(genes: list[str], n_hidden: int) -> dict:
    return {
        "gene_list": genes, "enc_mod": "flowformer", "enc_hid": n_hidden, "enc_layers": 2,
        "post_latent_dim": n_hidden // 2, "dec_mod": "nbmlp", "dec_hid": n_hidden,
        "dec_layers": 2, "out_dim": len(genes), "batch_num": 2, "dataset_num": 2,
        "model_dropout": 0.2, "norm": "groupnorm", "latent_mod": "vae", "cat_pe": False,
        "mask_node_rate": 0.75, "mask_feature_rate": 0.25, "dae": True, "lamda": 1.0,
    }  # fmt: skip


def annotation(args) -> None:
    import scvi
    from CellPLM.model import OmicsFormer
    from CellPLM.pipeline.cell_type_annotation import (
        CellTypeAnnotationDefaultModelConfig,
        CellTypeAnnotationPipeline,
    )
    from sklearn.metrics import f1_score
    from sklearn.model_selection import train_test_split

    import cellplm_scvi as cp
    from cellplm_scvi.official import ANNOTATION_OVERRIDES, annotation_recipe

    adata = ensembl_pbmc68k()
    genes = sorted(adata.var_names)
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    types = sorted(set(truth))
    print(f"# data: {adata.n_obs} cells x {adata.n_vars} genes, {len(types)} types")

    rows = []
    for seed in range(args.seed, args.seed + args.seeds):
        rest, test = train_test_split(
            np.arange(adata.n_obs), test_size=0.2, stratify=truth, random_state=seed
        )
        train, valid = train_test_split(
            rest, test_size=0.25, stratify=truth[rest], random_state=seed
        )
        split = np.full(adata.n_obs, "test", dtype=object)
        split[train], split[valid] = "train", "valid"
        adata.obs["split"] = split
        config = small_config(genes, args.n_hidden)
        torch.manual_seed(seed)
        off = OmicsFormer(**config)
        directory = Path(tempfile.mkdtemp())
        (directory / "small.config.json").write_text(json.dumps(config))
        torch.save({"model_state_dict": off.state_dict()}, directory / "small.best.ckpt")

        # official pipeline (labels as the official label encoder sees them)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        pipeline = CellTypeAnnotationPipeline(
            "small",
            {**CellTypeAnnotationDefaultModelConfig, "out_dim": len(types)},
            str(directory),
        )
        official_data = adata.copy()
        official_data.obs["label"] = official_data.obs["cell_type"].astype(str)
        with contextlib.redirect_stdout(io.StringIO()):
            pipeline.fit(
                official_data,
                {"epochs": args.epochs, "hvg": 3000},
                split_field="split",
                train_split="train",
                valid_split="valid",
                label_fields=["label"],
                ensembl_auto_conversion=False,
                device="cpu",
            )
            pred = pipeline.predict(official_data, ensembl_auto_conversion=False, device="cpu")
        names = pipeline.label_encoders["label"].classes_
        official_pred = np.asarray(names)[pred.numpy()]
        t_official = time.perf_counter() - t0
        is_test = split == "test"
        f1_official = f1_score(truth[is_test], official_pred[is_test], average="macro")

        # ours: the same checkpoint, data, split and epochs
        scvi.settings.seed = seed
        t0 = time.perf_counter()
        ours_data = adata.copy()
        cp.CellPLM.setup_anndata(ours_data, labels_key="cell_type")
        model = cp.CellPLM.load_official(
            str(directory / "small"), ours_data, **ANNOTATION_OVERRIDES
        )
        model.train(**annotation_recipe(max_epochs=args.epochs), enable_progress_bar=False)
        ours_pred = model.predict()
        t_ours = time.perf_counter() - t0
        f1_ours = f1_score(truth[is_test], ours_pred[is_test], average="macro")
        rows.append(
            {
                "seed": seed,
                "official F1": f1_official,
                "ours F1": f1_ours,
                "official s": t_official,
                "ours s": t_ours,
            }
        )
        print(rows[-1], flush=True)

    print_summary(
        f"Annotation, pbmc68k test cells (20%), {args.epochs} epochs, random small checkpoint",
        rows,
        ["official F1", "ours F1", "official s", "ours s"],
    )


def simulated_panel(args):
    """Spatial query + scRNA-seq reference in one AnnData (hidden genes zeroed later).

    Returns the joint AnnData (counts in ``X``; ``obs``: ``tech`` spatial/reference and
    ``batch``, the forward-pass group) and the boolean mask of its spatial cells.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    import cellplm_scvi as cp
    from cellplm_scvi.pp import assign_tissues, random_chunks

    reference = ensembl_pbmc68k()
    sim = cp.datasets.simulate_tissue(cells=reference, n_cells=args.n_cells, seed=args.seed)
    assign_tissues(sim, spatial_key="spatial", library_key="slide", max_cells=args.max_cells)
    chunks = random_chunks(np.zeros(reference.n_obs), args.max_cells, args.seed)
    spatial = ad.AnnData(
        X=sp.csr_matrix(sim.layers["counts"], dtype=np.float32),
        obs=pd.DataFrame(
            {"tech": "spatial", "batch": [f"sp{t}" for t in sim.obs["cellplm_tissue"]]},
            index=sim.obs_names,
        ),
        var=pd.DataFrame(index=sim.var_names),
    )
    ref = ad.AnnData(
        X=sp.csr_matrix(reference.X, dtype=np.float32),
        obs=pd.DataFrame(
            {"tech": "reference", "batch": [f"ref{c}" for c in chunks]},
            index="ref_" + reference.obs_names,
        ),
        var=pd.DataFrame(index=reference.var_names),
    )
    joint = ad.concat([spatial, ref])
    return joint, (joint.obs["tech"] == "spatial").to_numpy()


def official_imputation(adata, directory, targets, batch_gene_list, epochs, torch_seed):
    """Official ``ImputationPipeline.fit`` + ``predict`` (all cells x ``targets``) and its
    wall time."""
    from CellPLM.pipeline.imputation import ImputationDefaultModelConfig, ImputationPipeline

    torch.manual_seed(torch_seed)
    t0 = time.perf_counter()
    pipeline = ImputationPipeline("small", ImputationDefaultModelConfig, str(directory))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        pipeline.fit(
            adata,
            {"epochs": epochs},
            split_field="split",
            train_split="train",
            valid_split="valid",
            batch_gene_list=batch_gene_list,
            ensembl_auto_conversion=False,
            device="cpu",
        )
        pred = pipeline.predict(
            adata, {"target_genes": targets}, ensembl_auto_conversion=False, device="cpu"
        )  # cells x targets, in the order of adata
    return pred.numpy(), time.perf_counter() - t0


def imputation(args) -> None:
    import pandas as pd
    import scipy.sparse as sp
    import scvi

    import cellplm_scvi as cp
    from cellplm_scvi.model import IMPUTATION_OVERRIDES, imputation_recipe

    full, is_spatial = simulated_panel(args)
    truth_all = full.X.toarray()  # cells x genes, counts
    groups = np.asarray(sorted(full.obs["batch"].unique()))
    print(
        f"# data: {is_spatial.sum()} spatial + {(~is_spatial).sum()} reference cells x "
        f"{full.n_vars} genes, {len(groups)} forward-pass groups; panel of {args.n_panel}"
    )

    rows = []
    for seed in range(args.seed, args.seed + args.seeds):
        rng = np.random.default_rng(seed)
        measured = np.zeros(full.n_vars, dtype=bool)
        measured[rng.choice(full.n_vars, args.n_panel, replace=False)] = True
        targets = list(full.var_names[~measured])
        observed = truth_all * np.where(is_spatial[:, None], measured[None, :], True)
        adata = full.copy()
        adata.X = sp.csr_matrix(observed.astype(np.float32))
        valid_groups = rng.choice(groups, max(1, round(0.2 * len(groups))), replace=False)
        adata.obs["split"] = np.where(adata.obs["batch"].isin(valid_groups), "valid", "train")
        truth = truth_all[is_spatial][:, ~measured]  # spatial cells x hidden genes

        directory = Path(tempfile.mkdtemp())
        cp.datasets.random_official_checkpoint(
            directory / "small", latent="vae", n_hidden=args.n_hidden, n_layers=1, n_latent=16,
            seed=seed,
        )  # fmt: skip

        # official pipeline: `batch` = forward-pass group, measured genes per group
        panel, all_genes = list(adata.var_names[measured]), list(adata.var_names)
        batch_gene_list = {
            g: panel if g.startswith("sp") else all_genes for g in adata.obs["batch"].unique()
        }
        fit = (adata, directory, targets, batch_gene_list, args.epochs)
        pred, t_official = official_imputation(*fit, torch_seed=seed)
        official = per_gene_scores(pred[is_spatial], truth)["Pearson"]
        rerun = {}
        if args.rerun_official:  # same data and weights, other masks/dropout: official noise
            pred, _ = official_imputation(*fit, torch_seed=seed + 10_000)
            r = per_gene_scores(pred[is_spatial], truth)["Pearson"]
            rerun = {"official rerun r": r, "rerun - official": r - official}

        # ours: the same checkpoint, data, groups, split and epochs
        scvi.settings.seed = seed
        t0 = time.perf_counter()
        ours_data = adata.copy()
        ours_data.varm["measured"] = pd.DataFrame(
            {"spatial": measured, "reference": True}, index=ours_data.var_names
        )
        cp.CellPLM.setup_anndata(
            ours_data, batch_key="tech", tissue_key="batch", measured_genes_key="measured"
        )
        model = cp.CellPLM.load_official(
            str(directory / "small"), ours_data, **IMPUTATION_OVERRIDES
        )
        model.train(
            **imputation_recipe(max_epochs=args.epochs, split_key="split"),
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        spatial_rows = np.flatnonzero(is_spatial)
        read_outs = {
            library: model.impute_genes(targets, indices=spatial_rows, library=library)
            for library in ("all", "measured")
        }
        t_ours = time.perf_counter() - t0
        ours = {k: per_gene_scores(v.to_numpy(), truth)["Pearson"] for k, v in read_outs.items()}
        rows.append(
            {
                "seed": seed,
                "official r": official,
                'ours r ("all")': ours["all"],
                'ours r ("measured")': ours["measured"],
                '"all" - official': ours["all"] - official,
                **rerun,
                "official s": t_official,
                "ours s": t_ours,
            }
        )
        print(rows[-1], flush=True)

    print_summary(
        f"Imputation, hidden genes of the spatial cells (per-gene Pearson, log1p counts), "
        f"{args.epochs} epochs, random small checkpoint",
        rows,
        [k for k in rows[0] if k != "seed"],
    )


def main() -> None:
    p = parser(__doc__.splitlines()[0], epochs=20)
    p.add_argument("--task", choices=("annotation", "imputation"), default="annotation")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--n-hidden", type=int, default=64)
    p.add_argument("--n-cells", type=int, default=600, help="imputation: spatial cells")
    p.add_argument("--n-panel", type=int, default=300, help="imputation: measured genes")
    p.add_argument("--max-cells", type=int, default=300, help="imputation: cells per group")
    p.add_argument(
        "--rerun-official",
        action="store_true",
        help="imputation: fit the official pipeline twice per seed (other torch seed)",
    )
    args = p.parse_args()
    setup(args)
    annotation(args) if args.task == "annotation" else imputation(args)


if __name__ == "__main__":
    main()
