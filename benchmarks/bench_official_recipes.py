"""Official CellTypeAnnotationPipeline vs our annotation recipe, side by side (issue 12).

Both fine-tune the same random small official checkpoint (written in the official format, the
genes of pbmc68k as Ensembl IDs) on the same data and split (pbmc68k_reduced, 60/20/20 per
cell, stratified) for the same epochs, on the CPU, offline. Prints the test macro-F1 and the
wall time of each side for every seed, and mean +- sd over seeds (the run-to-run noise).
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
from _common import parser, print_table, setup


def small_config(genes: list[str], n_hidden: int) -> dict:
    return {
        "gene_list": genes, "enc_mod": "flowformer", "enc_hid": n_hidden, "enc_layers": 2,
        "post_latent_dim": n_hidden // 2, "dec_mod": "nbmlp", "dec_hid": n_hidden,
        "dec_layers": 2, "out_dim": len(genes), "batch_num": 2, "dataset_num": 2,
        "model_dropout": 0.2, "norm": "groupnorm", "latent_mod": "vae", "cat_pe": False,
        "mask_node_rate": 0.75, "mask_feature_rate": 0.25, "dae": True, "lamda": 1.0,
    }  # fmt: skip


def main() -> None:
    p = parser(__doc__.splitlines()[0], epochs=20)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--n-hidden", type=int, default=64)
    args = p.parse_args()
    setup(args)

    import scvi
    from CellPLM.model import OmicsFormer
    from CellPLM.pipeline.cell_type_annotation import (
        CellTypeAnnotationDefaultModelConfig,
        CellTypeAnnotationPipeline,
    )
    from sklearn.metrics import f1_score
    from sklearn.model_selection import train_test_split

    import cellplm_scvi as cp
    from cellplm_scvi._genes import official_config, to_ensembl
    from cellplm_scvi.model._official import ANNOTATION_OVERRIDES, annotation_recipe

    adata = cp.datasets.pbmc68k_counts()
    adata.X = adata.layers["counts"].copy()
    ensembl = np.asarray(to_ensembl(adata.var_names), dtype=object)
    vocabulary = set(official_config()["gene_list"])
    keep = np.array([g in vocabulary for g in ensembl])
    adata = adata[:, keep].copy()
    adata.var_names = list(ensembl[keep])
    adata.var_names_make_unique()
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

    columns = ["official F1", "ours F1", "official s", "ours s"]
    summary = {"seed": "mean"} | {c: float(np.mean([r[c] for r in rows])) for c in columns}
    spread = {"seed": "sd"} | {c: float(np.std([r[c] for r in rows], ddof=1)) for c in columns}
    print_table(
        f"Annotation, pbmc68k test cells (20%), {args.epochs} epochs, random small checkpoint",
        [*rows, summary, spread],
        ["seed", *columns],
    )


if __name__ == "__main__":
    main()
