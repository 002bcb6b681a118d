"""Perturbation minibatches: the cells of one condition as targets, control cells as input.

A Perturb-seq screen measures different cells under each condition, so a perturbed cell has no
measured "before". As in GEARS, each perturbed cell of a step is paired with a random control
cell: the model reads the control cells, each put under the step's perturbation, and is scored
on how well it reproduces the condition's cells (unpaired, row by row, with their own library
sizes). One step = one condition's cells (at most ``max_cells``) + as many control cells drawn
at random: the control cells of a step attend to each other, so a tissue is a control
population under one perturbation. The control condition itself is a step too (control cells
reproducing other control cells), so "no perturbation" is learnt as well.
"""

from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from .._constants import (
    LABELS_KEY,
    PERTURBATION_KEY,
    PERTURBED_GENES_KEY,
    PERTURBED_X_KEY,
    X_KEY,
)
from ._tissue_loader import TissueDataset, _group_by

TARGET_KEYS = ("batch", "extra_categorical_covs")  # decoder covariates: the targets' own


class PerturbationSampler(Sampler):
    """Yield ``(target rows, control rows)`` per step, one step per condition, shuffled.

    Parameters
    ----------
    rows
        Training rows (positions in the AnnData).
    codes
        Condition code of each of those rows.
    control_code
        Code of the control condition.
    max_cells
        Cap on target cells per step (a random subset of larger conditions); the step's control
        cells are as many, drawn without replacement (so a step never holds more target cells
        than there are control cells to pair them with).
    seed
        Base seed; each pass over the conditions draws anew.
    """

    def __init__(
        self,
        rows: np.ndarray,
        codes: np.ndarray,
        control_code: int,
        max_cells: int | None,
        seed: int = 0,
    ):
        rows, codes = np.asarray(rows, dtype=np.int64), np.asarray(codes).reshape(-1)
        self.controls = rows[codes == control_code]
        if len(self.controls) < 2:
            raise ValueError(
                "Perturbation training needs at least two control cells among the training cells "
                "(setup_anndata(control_category=...) names them)."
            )
        self.conditions = _group_by(rows, codes)  # one array of rows per condition
        self.control_rows = {int(r) for r in self.controls}
        self.max_cells, self.seed, self.epoch = max_cells, seed, 0

    def __len__(self) -> int:
        return len(self.conditions)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        for i in rng.permutation(len(self.conditions)):
            target = self.conditions[i]
            if int(target[0]) in self.control_rows:  # controls: half predict the other half
                shuffled = rng.permutation(self.controls)
                target, pool = np.array_split(shuffled, 2)
            else:
                pool = self.controls
            n = min(len(target), len(pool), self.max_cells or len(target))
            target = rng.choice(target, n, replace=False)
            control = rng.choice(pool, n, replace=False)
            yield target.tolist(), control.tolist()


class PerturbationDataset(Dataset):
    """Reads a step: the control rows as input (``X``), the target rows' counts as
    ``"perturbed_x"``, and the condition's genes (``condition_genes[code]``, vocabulary rows,
    -1: none) for every row as ``"perturbed_genes"`` ((N, 2) long)."""

    def __init__(self, adata_manager, condition_genes: np.ndarray, gene_layout=None):
        self.cells = TissueDataset(adata_manager, gene_layout=gene_layout)
        self.condition_genes = torch.as_tensor(condition_genes, dtype=torch.long)  # (C, 2)

    def __len__(self) -> int:
        return len(self.cells)

    def __getitem__(self, step: tuple[list[int], list[int]]) -> dict[str, torch.Tensor]:
        target_rows, control_rows = step
        out = self.cells[control_rows]  # input: the control cells, with the gene layout
        target = self.cells[target_rows]
        out[PERTURBED_X_KEY] = target[X_KEY]
        out.update({k: target[k] for k in TARGET_KEYS if k in target})
        out.pop(LABELS_KEY, None)  # the cell-type head has no part in this objective
        code = int(target[PERTURBATION_KEY].view(-1)[0])
        out[PERTURBED_GENES_KEY] = self.condition_genes[code].expand(len(control_rows), -1)
        return out


class PerturbationDataModule(LightningDataModule):
    """Training steps of the perturbation objective (no validation split).

    Parameters
    ----------
    adata_manager
        The model's :class:`~scvi.data.AnnDataManager` (with a registered condition).
    condition_genes
        (n_conditions, 2) vocabulary rows of each registered condition's genes (-1: none).
    control_code
        Code of the control condition.
    train_rows
        Rows that train (e.g. ``obs["split"] == "train"``).
    max_cells_per_step
        Cap on target cells per step.
    gene_layout
        The model's :class:`~cellplm_scvi._vocabulary.GeneLayout` of the AnnData.
    seed
        Seed of the draws.
    """

    def __init__(
        self,
        adata_manager,
        condition_genes: np.ndarray,
        control_code: int,
        train_rows: np.ndarray,
        max_cells_per_step: int | None = None,
        gene_layout=None,
        seed: int = 0,
    ):
        super().__init__()
        self.adata_manager = adata_manager
        self.condition_genes, self.control_code = condition_genes, control_code
        self.train_idx = np.asarray(train_rows, dtype=np.int64)
        self.val_idx = self.test_idx = np.zeros(0, dtype=np.int64)
        self.n_train, self.n_val = len(self.train_idx), 0
        self.n_obs = adata_manager.adata.n_obs
        self.max_cells, self.gene_layout, self.seed = max_cells_per_step, gene_layout, seed
        codes = np.asarray(adata_manager.get_from_registry(PERTURBATION_KEY)).reshape(-1)
        self.sampler = PerturbationSampler(
            self.train_idx, codes[self.train_idx], control_code, max_cells_per_step, seed
        )

    def train_dataloader(self) -> DataLoader:
        """One condition per step, in random order."""
        dataset = PerturbationDataset(self.adata_manager, self.condition_genes, self.gene_layout)
        return DataLoader(dataset, sampler=self.sampler, batch_size=None)
