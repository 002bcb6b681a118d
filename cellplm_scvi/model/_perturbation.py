"""Genetic perturbation prediction: :class:`PerturbationMixin` (``predict_perturbation``).

What the model is told, and why
-------------------------------
Cells are tokens; a perturbation is information added to the tokens of the cells it acts on.
GEARS pairs each perturbed cell with a random control cell and predicts the perturbed
expression from the control expression plus a perturbation embedding built on a gene graph.
scGPT marks the perturbed genes with a flag token among a control cell's gene tokens. CellPLM
has no per-gene tokens inside a cell (a cell token is the ``log1p``-weighted sum of gene
embeddings), so the perturbation enters as one vector added to each control cell's token:
``MLP(LayerNorm(E[A])) + MLP(LayerNorm(E[B]))``, read from the model's gene-embedding table
``E`` (see :class:`~cellplm_scvi.nn.PerturbationEncoder`). The decoder is told it too (a shift
of its input and of each gene's log mean; the perturbed genes' own log means get one learned
shift, the same for every gene). Every vocabulary gene has a row of ``E``, so a gene never
perturbed in training still has a perturbation embedding: how useful it is depends on how much
the rows of ``E`` say about the genes (pretrained rows, from
:meth:`~cellplm_scvi.CellPLM.load_official`, were meant to).

What a tissue is here
---------------------
Perturb-seq cells are dissociated: no cell has neighbours. The cells that attend to each other
in one forward pass are a control population put under one perturbation (training: the control
cells paired with one condition's cells; prediction: ``n_samples`` control cells). The
attention then sees the population the perturbation acts on (its cell-state mix), never cells
of another condition, and the prediction of a condition does not depend on which other
conditions are asked for.

The objective
-------------
``train()`` fits the perturbation objective alone: the NB likelihood of a condition's cells
given control cells under that perturbation, with the targets' own library sizes, plus the
latent (KL) loss; the input control cells are masked as in CellPLM's objective (an
augmentation). The masked-reconstruction objective is not added: its targets are the input
cells themselves, which would pull the decoder towards "no change". See
:mod:`cellplm_scvi.data._perturbation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import settings
from scvi.data.fields import CategoricalObsField

from .._constants import LABELS_KEY, PERTURBATION_KEY, PERTURBED_GENES_KEY, X_KEY
from .._quiet import ignore_warnings
from ..data._perturbation import PerturbationDataModule
from ..data._tissue_loader import TissueDataset
from ..official._mixin import model_vocabulary

MAX_GENES = 2  # genes per condition: singles and doubles (GEARS / Norman naming)
CONTROL_TOKEN = "ctrl"  # the placeholder of GEARS' "A+ctrl"
# train() arguments of the tissue splitter, which perturbation training does not build
SPLITTER_ARGUMENTS = (
    "train_size",
    "validation_size",
    "shuffle_set_split",
    "early_stopping",
    "drop_node_rate",
    "max_cells_per_step",
    "redraw_tissues",
    "pack_tissues",
)


def parse_condition(condition: str, control_category: str = "ctrl") -> tuple[str, ...]:
    """The genes of a condition name: ``()`` for the control, ``("A",)`` for ``"A"``,
    ``"A+ctrl"`` or ``"ctrl+A"``, ``("A", "B")`` for ``"A+B"``.

    Raises
    ------
    ValueError
        On a name that is not a string, has an empty part (``"A+"``), names no gene
        (``"ctrl+ctrl"``), more than two genes, or the same gene twice.
    """
    fix = f"write a condition as {control_category!r}, 'A', 'A+ctrl' or 'A+B'."
    if not isinstance(condition, str):
        raise ValueError(f"A condition must be a string, got {condition!r}: {fix}")
    if condition == control_category:
        return ()
    parts = condition.split("+")
    if any(not part or part != part.strip() for part in parts):
        raise ValueError(f"Condition {condition!r} has an empty or padded part: {fix}")
    if len(parts) > MAX_GENES:
        raise ValueError(
            f"Condition {condition!r} has {len(parts)} parts: at most two genes are supported "
            f"(no triples); {fix}"
        )
    genes = tuple(p for p in parts if p not in (CONTROL_TOKEN, control_category))
    if not genes:
        raise ValueError(f"Condition {condition!r} names no gene: {fix}")
    if len(set(genes)) < len(genes):
        raise ValueError(f"Condition {condition!r} names the same gene twice: {fix}")
    return genes


def perturbation_fields(
    adata: AnnData, perturbation_key: str | None, control_category: str
) -> list[CategoricalObsField]:
    """Check ``adata.obs[perturbation_key]`` and return its registry field (``[]`` for
    ``None``). Every condition must parse (:func:`parse_condition`), every named gene must be a
    gene of the AnnData (``var_names``) and the control category must be present."""
    if perturbation_key is None:
        return []
    if perturbation_key not in adata.obs:
        raise KeyError(
            f"perturbation_key={perturbation_key!r} is not a column of adata.obs; pass the "
            "column of conditions ('ctrl', 'A+ctrl', 'A+B', ...)."
        )
    values = adata.obs[perturbation_key]
    if values.isna().any():
        raise ValueError(
            f"adata.obs[{perturbation_key!r}] has missing values: give every cell a condition "
            f"(the control cells: {control_category!r})."
        )
    conditions = pd.unique(values.astype(str))
    if control_category not in conditions:
        raise ValueError(
            f"control_category={control_category!r} is not a value of "
            f"adata.obs[{perturbation_key!r}] (values: {sorted(conditions)[:5]}...): pass the "
            "label of the unperturbed cells."
        )
    genes = set(adata.var_names)
    unknown = {}
    for condition in conditions:
        missing = [g for g in parse_condition(condition, control_category) if g not in genes]
        if missing:
            unknown[condition] = missing
    if unknown:
        raise ValueError(
            f"adata.obs[{perturbation_key!r}] names genes that are not in adata.var_names: "
            f"{dict(list(unknown.items())[:5])}. Every perturbed gene must be a gene of the "
            "AnnData: rename the conditions to var_names, or add the genes."
        )
    return [CategoricalObsField(PERTURBATION_KEY, perturbation_key)]


class PerturbationMixin:
    """``train`` with the perturbation objective, and :meth:`predict_perturbation`."""

    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int | None = 4000,
        datasplitter_kwargs: dict | None = None,
        **kwargs,
    ):
        """Train; a model set up with ``perturbation_key`` fits the perturbation objective.

        Without ``perturbation_key`` this is :meth:`TrainingMixin.train
        <cellplm_scvi.model._training.TrainingMixin.train>`. With it, each step is one
        condition's cells (at most ``batch_size``) as targets and as many random control
        cells as input, put under the condition's perturbation (see
        :mod:`cellplm_scvi.model._perturbation`); every condition is one step per epoch. There
        is no validation split: hold conditions out of training with
        ``datasplitter_kwargs={"split_key": column}`` (only cells whose value is ``"train"``
        train) or by setting up a subset.

        Parameters
        ----------
        max_epochs
            Passes over the conditions (default: scvi-tools' heuristic on ``n_obs``).
        batch_size
            Cap on target cells per step (``None``: all the condition's cells).
        datasplitter_kwargs
            ``{"split_key": column}`` (perturbation training); other keys go to the tissue
            splitter of a model without ``perturbation_key``.
        **kwargs
            As :meth:`TrainingMixin.train <cellplm_scvi.model._training.TrainingMixin.train>`
            (``lr``, ``plan_kwargs``, trainer arguments, ...).
        """
        if not self.has_perturbations or kwargs.get("datamodule") is not None:
            return super().train(
                max_epochs=max_epochs,
                batch_size=batch_size,
                datasplitter_kwargs=datasplitter_kwargs,
                **kwargs,
            )
        from .._validation import check_loader_options
        from ._training import check_train_arguments, check_training_data

        ignored = sorted(k for k in SPLITTER_ARGUMENTS if k in kwargs)
        if ignored:
            raise ValueError(
                f"{ignored} do not apply to perturbation training (one condition per step, no "
                "validation split): leave them out; batch_size caps the target cells per step and "
                "datasplitter_kwargs={'split_key': column} holds conditions out."
            )
        options = dict(datasplitter_kwargs or {})
        split_key = options.pop("split_key", None)
        if options:
            raise ValueError(
                f"datasplitter_kwargs {sorted(options)} do not apply to perturbation training: "
                "only 'split_key' (cells whose value is 'train' train)."
            )
        check_train_arguments(batch_size, None)
        check_loader_options(False, kwargs.pop("load_sparse_tensor", None), None)
        check_training_data(self, None)
        rows = np.arange(self.adata.n_obs)
        if split_key is not None:
            if split_key not in self.adata.obs:
                raise KeyError(f"split_key {split_key!r} is not a column of adata.obs.")
            rows = np.flatnonzero(self.adata.obs[split_key].astype(str).to_numpy() == "train")
        datamodule = PerturbationDataModule(
            self.adata_manager,
            self._condition_genes(),
            self._control_code(),
            rows,
            max_cells_per_step=batch_size,
            gene_layout=self._gene_layout,
            seed=settings.seed or 0,
        )
        no_validation = [{"message": ".*have no `val_dataloader`"}]  # none is asked for
        with ignore_warnings(no_validation):
            return super().train(max_epochs=max_epochs, datamodule=datamodule, **kwargs)

    @property
    def has_perturbations(self) -> bool:
        """Whether the model was set up with ``perturbation_key`` (and can predict them)."""
        manager = self.adata_manager  # None for a model built from a data module's registry
        return manager is not None and PERTURBATION_KEY in manager.data_registry

    @torch.inference_mode()
    def predict_perturbation(
        self,
        conditions: Sequence[str],
        n_samples: int = 300,
        batch_size: int | None = None,
        seed: int = 0,
        counts: Literal["sample", "mean"] = "sample",
    ) -> AnnData:
        """Predicted mean expression of cells under each condition.

        ``n_samples`` control cells of the model's AnnData (drawn with ``seed``, the same draw
        for every condition; with replacement only if there are fewer) are put under the
        condition and encoded together as one tissue (chunks of ``batch_size``); the decoder
        gives each an NB, and each predicted cell is scored as ``log1p(counts / total * 1e4)``
        over the model's genes.

        Conditions never seen in training are allowed (unseen single genes, unseen pairs) as
        long as each gene is in the model's vocabulary: a gene of the AnnData that the
        vocabulary holds, or a vocabulary entry (e.g. an Ensembl ID of an official checkpoint).

        Parameters
        ----------
        conditions
            Condition names in GEARS naming: ``"ctrl"`` (the ``control_category``), ``"A"``,
            ``"A+ctrl"``, ``"A+B"``. No duplicates.
        n_samples
            Predicted cells per condition.
        batch_size
            Cells per forward pass (``None``: all ``n_samples`` in one tissue).
        seed
            Seed of the control draw and of the NB samples.
        counts
            ``"sample"`` (default): each predicted cell is a draw of counts from its NB at the
            control cell's library size, so the score has the scale of measured cells (the
            ``log1p`` of noisy counts is lower than that of their mean). ``"mean"``: the NB
            mean itself (noise-free, library-free).

        Returns
        -------
        AnnData
            One row per condition, in the order given (``obs_names``: the conditions),
            ``var_names``: the model's genes (:attr:`matched_genes`), ``X``: dense float32.
        """
        self._require_perturbations()
        conditions = [conditions] if isinstance(conditions, str) else list(conditions)
        if not conditions:
            raise ValueError("conditions is empty: pass a list of condition names.")
        duplicated = sorted({c for c in conditions if conditions.count(c) > 1}, key=str)
        if duplicated:
            raise ValueError(f"conditions has duplicates {duplicated[:5]}: ask for each once.")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive int, got {n_samples!r}.")
        if counts not in ("sample", "mean"):
            raise ValueError(f"counts must be 'sample' or 'mean', got {counts!r}.")
        names = self._gene_rows()
        genes = np.stack([self._condition_rows(c, names) for c in conditions])  # (K, 2)
        codes = np.asarray(self.get_from_registry(self.adata, PERTURBATION_KEY)).reshape(-1)
        controls = np.flatnonzero(codes == self._control_code())
        rng = np.random.default_rng(seed)
        drawn = rng.choice(controls, n_samples, replace=n_samples > len(controls))  # (S,)
        cells_of = TissueDataset(self.adata_manager, gene_layout=self._gene_layout)  # as training
        matched = None if self._gene_layout is None else self._gene_layout.matched_columns
        step = n_samples if batch_size is None else int(batch_size)
        chunks = [drawn[i : i + step] for i in range(0, n_samples, step)]
        module = self.module
        module.eval()
        out = np.zeros((len(conditions), len(self.matched_genes)), dtype=np.float64)
        with torch.random.fork_rng(devices=[]):
            for k, rows in enumerate(genes):
                torch.manual_seed(seed)  # the same draws for every condition, wherever it is
                for chunk in chunks:
                    # the control cells with their own covariates (batch, ...) and gene layout
                    tensors = cells_of[np.sort(chunk).tolist()]
                    tensors.pop(LABELS_KEY, None)
                    tensors[PERTURBED_GENES_KEY] = torch.as_tensor(rows).expand(len(chunk), -1)
                    inference = module.inference(**module._get_inference_input(tensors))
                    px = module.generative(**module._get_generative_input(tensors, inference))
                    cells = px["px"].sample() if counts == "sample" else px["px"].mu  # (n, G)
                    cells = cells.float().cpu()
                    if matched is not None:
                        cells = cells[:, torch.as_tensor(matched)]
                    total = cells.sum(1, keepdim=True).clamp_min(1e-12)
                    out[k] += torch.log1p(cells / total * 1e4).sum(0).double().numpy()
        prediction = AnnData(
            X=(out / n_samples).astype(np.float32),
            obs=pd.DataFrame({"condition": conditions}, index=pd.Index(conditions, dtype=str)),
            var=pd.DataFrame(index=pd.Index(self.matched_genes, dtype=str)),
        )
        prediction.uns["predict_perturbation"] = {
            "n_samples": n_samples,
            "seed": seed,
            "counts": counts,
        }
        return prediction

    # ------------------------------------------------------------------ helpers
    def _require_perturbations(self) -> None:
        if not self.has_perturbations:
            raise ValueError(
                "This model was set up without conditions: call "
                "CellPLM.setup_anndata(adata, perturbation_key='condition', "
                "control_category='ctrl') before creating and training the model."
            )

    @property
    def _control_category(self) -> str:
        return self.adata_manager.registry["setup_args"].get("control_category", "ctrl")

    def _control_code(self) -> int:
        mapping = self.adata_manager.get_state_registry(PERTURBATION_KEY).categorical_mapping
        return int(np.flatnonzero(np.asarray(mapping).astype(str) == self._control_category)[0])

    def _gene_rows(self) -> dict[str, int]:
        """Gene name -> vocabulary row: the vocabulary's entries, then the AnnData's genes
        through the model's gene layout (e.g. symbols matched to Ensembl IDs)."""
        rows = {gene: i for i, gene in enumerate(model_vocabulary(self))}
        names = self.adata_manager.get_state_registry(X_KEY).column_names
        index = None if self._gene_layout is None else self._gene_layout.gene_index
        for j, name in enumerate(names):
            row = j if index is None else int(index[j])
            if row >= 0:
                rows[str(name)] = row
        return rows

    def _condition_rows(self, condition: str, rows: dict[str, int] | None = None) -> np.ndarray:
        """(2,) vocabulary rows of a condition's genes, -1 padded."""
        rows = self._gene_rows() if rows is None else rows
        genes = parse_condition(condition, self._control_category)
        unknown = [g for g in genes if g not in rows]
        if unknown:
            raise ValueError(
                f"Condition {condition!r}: genes {unknown} are not in the model's vocabulary "
                f"({len(rows)} names: the AnnData's genes in it and the vocabulary's entries); "
                "a perturbation can only be predicted for a gene the model has an embedding of."
            )
        out = np.full(MAX_GENES, -1, dtype=np.int64)
        out[: len(genes)] = [rows[g] for g in genes]
        return out

    def _condition_genes(self) -> np.ndarray:
        """(n_conditions, 2) vocabulary rows of every registered condition's genes."""
        mapping = self.adata_manager.get_state_registry(PERTURBATION_KEY).categorical_mapping
        rows = self._gene_rows()
        return np.stack([self._condition_rows(str(c), rows) for c in mapping])
