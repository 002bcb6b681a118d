"""Train a tiny CellPLM on a TissueCorpus with N CPU processes (Lightning DDP, gloo).

Used by tests/test_ddp.py::

    python tests/scripts/ddp_corpus.py OUT_DIR N_DEVICES FILE [FILE ...]

Every rank writes ``OUT_DIR/rank{r}.json``: the tissues of each of its steps, by epoch (read
from the minibatches the trainer really got). Rank 0 also writes ``OUT_DIR/step0.pt``: the
module's weights before the first step, and the gradients of the first optimiser step after
DDP's all-reduce (before clipping and the GMVAE floor).

Randomness is fixed (the injected masks of the gradient test, as in tests/test_packing.py):
``sample_mask`` returns one mask per tissue size, drawn by the official rule from a generator
seeded by the size; ``torch.rand_like`` / ``torch.randn_like`` (Gumbel and reparameterisation
noise) return 0.5 / 0; dropout is 0. So one process can recompute the step, tissue by tissue
or packed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import scvi
import torch
from lightning.pytorch.callbacks import Callback

import cellplm_scvi as cp
from cellplm_scvi._constants import TISSUE_KEY
from cellplm_scvi.module import _cellplm as module_impl
from cellplm_scvi.module._masking import TissueMask

VOCAB_SIZE = 40
MAX_EPOCHS = 2
CORPUS_KWARGS = {
    "gene_key": [None, "symbol", None, None],
    "batch_key": "sample",
    "spatial_key": [None, None, "spatial", None],
    "max_cells": 64,
    "validation_size": 0.25,  # 15 training tissues: one rank gets a padding repeat
}
MODEL_KWARGS = {"n_hidden": 16, "n_layers": 1, "n_latent": 4, "dropout": 0.0}


def fix_randomness(setattr=setattr) -> None:
    """Fixed masks (one per tissue size) and constant noise; ``setattr`` may be pytest's
    ``monkeypatch.setattr``."""
    masks = {}

    def fixed_mask(n_cells, n_genes, cell_rate, gene_rate, device, hide_rate=0.0):
        if (n_cells, n_genes) not in masks:
            gen = torch.Generator().manual_seed(n_cells)
            cells = torch.randperm(n_cells, generator=gen)[: max(1, int(cell_rate * n_cells))]
            entries = torch.rand(len(cells), n_genes, generator=gen) <= gene_rate
            masks[n_cells, n_genes] = TissueMask(cells, entries)
        return masks[n_cells, n_genes]

    setattr(module_impl, "sample_mask", fixed_mask)
    setattr(torch, "rand_like", lambda t, **kw: torch.full_like(t, 0.5))
    setattr(torch, "randn_like", lambda t, **kw: torch.zeros_like(t))


def build_model(dm) -> cp.CellPLM:
    model = cp.CellPLM(adata=None, registry=dm.registry, **MODEL_KWARGS)
    for layer in model.module.modules():
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.0  # includes the flow attention's fixed 0.01
    return model


class Recorder(Callback):
    def __init__(self, out: Path):
        self.out, self.steps, self.step0 = out, {}, None

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == 0:
            weights = {k: v.detach().clone() for k, v in pl_module.module.state_dict().items()}
            self.step0 = {"weights": weights}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        tissues = sorted({int(t) for t in batch[TISSUE_KEY].view(-1).tolist()})
        self.steps.setdefault(str(trainer.current_epoch), []).append(tissues)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_rank == 0 and trainer.global_step == 0:
            grads = {
                n: p.grad.detach().clone()
                for n, p in pl_module.module.named_parameters()
                if p.grad is not None
            }
            self.step0["grads"] = grads
            torch.save(self.step0, self.out / "step0.pt")

    def on_train_end(self, trainer, pl_module):
        record = {"world_size": trainer.world_size, "steps": self.steps}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def corpus(files: list[str], cache_dir: Path) -> cp.data.TissueCorpus:
    vocab = cp._genes.official_config()["gene_list"][:VOCAB_SIZE]
    return cp.data.TissueCorpus(files, vocabulary=vocab, cache_dir=cache_dir, **CORPUS_KWARGS)


def main(out: str, devices: int, files: list[str]) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    scvi.settings.seed = 0
    dm = corpus(files, out_dir / "tissue_cache")
    fix_randomness()
    model = build_model(dm)
    kwargs = {"strategy": "ddp", "devices": devices} if devices > 1 else {"devices": 1}
    model.train(
        datamodule=dm,
        max_epochs=MAX_EPOCHS,
        accelerator="cpu",
        lr=1e-3,
        plan_kwargs={"n_epochs_kl_warmup": None, "max_kl_weight": 1.0},  # KL weight 1, as the test
        gradient_clip_val=None,
        enable_progress_bar=False,
        callbacks=[Recorder(out_dir)],
        **kwargs,
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
