"""Train a tiny CellPLM on a TissueCorpus with step checkpoints; optionally die, or resume.

Used by tests/test_resume.py::

    python tests/scripts/resume_train.py MODE OUT_DIR CKPT_DIR FILE [FILE ...]
    python tests/scripts/resume_train.py MODE OUT_DIR CKPT_DIR anndata

The second form trains on one in-memory AnnData (the tissue splitter) instead: 20 tissues of
12 cells, 16 of them for training, so it has the corpus run's 16 steps per epoch.

``MODE``: ``full`` (uninterrupted run, checkpoints on), ``crash:K`` (SIGKILL itself at the end
of global step K, after the checkpoint of an earlier step was written) or ``resume`` (same
command with ``ckpt_path="last"``). Every training step appends one JSON line to
``OUT_DIR/steps.jsonl`` *before* the step runs (global step, epoch, batch index, the tissues of
the minibatch), so the steps a killed run took survive it; ``OUT_DIR/losses.jsonl`` gets each
step's loss. A finished run writes ``OUT_DIR/result.json`` (per-epoch losses, final global
step, final weights); ``OUT_DIR/start.json`` holds what the run found at its first step
(global step, AdamW step count, KL warm-up counter, the loader's position).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import scvi
import torch
from lightning.pytorch.callbacks import Callback

import cellplm_scvi as cp
from cellplm_scvi._constants import TISSUE_KEY

VOCAB_SIZE = 40
MAX_EPOCHS = 2
EVERY_N_STEPS = int(os.environ.get("RESUME_EVERY_N_STEPS", 3))


class Recorder(Callback):
    """Writes each step's tissues before it runs, and the state found at the first step."""

    def __init__(self, out: Path, crash_at: int | None):
        self.out, self.crash_at, self.started = out, crash_at, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.started:
            self.started = True
            optimizer = trainer.optimizers[0]
            steps = [float(s["step"]) for s in optimizer.state.values() if "step" in s]
            latent = pl_module.module.latent.layers[1]
            loader = trainer.fit_loop._combined_loader.flattened[0]
            start = {
                "global_step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "adam_step": max(steps) if steps else 0.0,
                "kl_step_count": int(latent.kl_step_count),
                "loader_state": loader.state_dict(),
            }
            (self.out / "start.json").write_text(json.dumps(start))
        tissues = sorted({int(t) for t in batch[TISSUE_KEY].view(-1).tolist()})
        record = {
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "batch_idx": batch_idx,
            "tissues": tissues,
        }
        with open(self.out / "steps.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
        with open(self.out / "losses.jsonl", "a") as f:
            f.write(json.dumps({"global_step": trainer.global_step - 1, "loss": loss}) + "\n")
        if self.crash_at is not None and trainer.global_step == self.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash: no clean-up, no final save


def _anndata(vocab: list[str]):
    """20 tissues of 12 cells (counts seeded), set up for CellPLM."""
    import anndata as ad
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    adata = ad.AnnData(sp.csr_matrix(rng.poisson(1.0, (240, len(vocab))).astype(np.float32)))
    adata.var_names = vocab
    adata.obs["tissue"] = [f"t{i // 12:02d}" for i in range(240)]
    cp.CellPLM.setup_anndata(adata, tissue_key="tissue")
    return adata


def main(mode: str, out: str, ckpt_dir: str, files: list[str]) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    scvi.settings.seed = 0
    vocab = cp._genes.official_config()["gene_list"][:VOCAB_SIZE]
    arch = {"n_hidden": 16, "n_layers": 1, "n_latent": 4, "latent": "vae"}
    if files == ["anndata"]:
        model = cp.CellPLM(_anndata(vocab), **arch)
        data_kwargs = {"train_size": 0.8, "datasplitter_kwargs": {"split_by": "tissues"}}
    else:
        dm = _corpus(files, vocab, ckpt_dir)
        model = cp.CellPLM(adata=None, registry=dm.registry, **arch)
        data_kwargs = {"datamodule": dm}
    crash_at = int(mode.split(":")[1]) if mode.startswith("crash:") else None
    model.train(
        max_epochs=MAX_EPOCHS,
        accelerator="cpu",
        devices=1,
        lr=1e-3,
        plan_kwargs={"n_steps_lr_warmup": 10},
        enable_progress_bar=False,
        callbacks=[Recorder(out_dir, crash_at)],
        checkpoint_every_n_steps=EVERY_N_STEPS,
        checkpoint_dir=ckpt_dir,
        ckpt_path="last" if mode == "resume" else None,
        **data_kwargs,
    )
    weights = torch.cat([p.detach().flatten() for p in model.module.parameters()])
    if files == ["anndata"]:
        splitter = model.trainer.datamodule
        train_tissues = np.unique(splitter._codes[splitter.train_idx])
        n_steps = len(splitter.train_dataloader())
    else:
        train_tissues, n_steps = np.asarray(dm.train_tissues), len(dm.sampler("train"))
    result = {
        "train_loss": model.history["train_loss"]["train_loss"].astype(float).tolist(),
        "global_step": model.trainer.global_step,
        "weights": weights.double().numpy().tolist(),
        "kl_step_count": int(model.module.latent.layers[1].kl_step_count),
        "n_steps_per_epoch": n_steps,
        "train_tissues": train_tissues.tolist(),
    }
    (out_dir / "result.json").write_text(json.dumps(result))


def _corpus(files: list[str], vocab: list[str], ckpt_dir: str) -> cp.data.TissueCorpus:
    return cp.data.TissueCorpus(
        files,
        vocabulary=vocab,
        gene_key=[None, "symbol", None, None],
        batch_key="sample",
        spatial_key=[None, None, "spatial", None],
        max_cells=64,
        validation_size=0.2,
        cache_dir=Path(ckpt_dir).parent / "tissue_cache",
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
