"""Training: :class:`TrainingMixin` wraps scvi-tools' ``UnsupervisedTrainingMixin.train``.

CellPLM's minibatch is a tissue, so ``batch_size`` is a cell budget per step: it goes to
:class:`~cellplm_scvi.data.TissueDataSplitter` as ``max_cells_per_step`` (with the node drop,
redrawn or packed tissues), never as scvi-tools' 128-cell default. ``train`` builds that
splitter and hands it to scvi-tools' ``train`` as its data module (scvi-tools 1.5 forwards
``batch_size`` and the split sizes to a data module's ``set_batch_size``/``set_split``, which the
splitter does not define: it is built with them); scvi-tools builds the training plan and the
runner; :class:`TissueTrainRunner` adds the step checkpoints and refuses a validation request
without validation tissues.

Step checkpoints (``train(checkpoint_every_n_steps=N)``) and resume after a crash: scvi-tools'
:class:`~scvi.train.Trainer` passes ``enable_checkpointing=False`` to Lightning unless asked, and
when asked (``enable_checkpointing=True``) it adds its own :class:`~scvi.train.SaveCheckpoint`: a
``model.save`` directory per validation epoch that holds weights only (no optimiser, scheduler or
loop state: nothing to resume from), and that forces validation every epoch. A plain Lightning
``ModelCheckpoint`` in ``callbacks=`` with the default ``enable_checkpointing=False`` is refused by
Lightning ("found ModelCheckpoint in callbacks list"). So :class:`TissueTrainRunner` lets scvi-
tools build the trainer, then adds a Lightning ``ModelCheckpoint(every_n_train_steps=N,
save_last=True)`` to its callbacks; ``ckpt_path`` goes to ``Trainer.fit`` through scvi-tools'
:class:`~scvi.train.TrainRunner` (1.4 and 1.5 both pop it from the trainer arguments and pass it to
``fit``).

A Lightning checkpoint holds the training plan's ``state_dict`` (module weights and buffers:
the VAE latent's KL warm-up counter ``kl_step_count``), AdamW's moments, the learning-rate
schedulers, the loops (global step, epoch, batch within the epoch), the training loader's
``state_dict`` (:class:`~cellplm_scvi.data._resume.ResumableLoader`: the tissue sampler's
place in the epoch) and what :class:`~cellplm_scvi.model.CellPLMTrainingPlan` adds (random
number generators, official plateau scheduler, best validation state).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from lightning.pytorch.callbacks import ModelCheckpoint
from scvi import settings
from scvi.model._utils import get_max_epochs_heuristic, use_distributed_sampler
from scvi.model.base import UnsupervisedTrainingMixin
from scvi.train import TrainRunner
from scvi.train._config import merge_kwargs

from .._constants import TISSUE_KEY
from .._quiet import quiet_training
from .._validation import check_batch_size, check_counts_sample, check_loader_options
from ..nn import VAELatent
from ..official._mixin import model_vocabulary
from ._presets import resolve_redraw_tissues
from ._setup import check_tissue_codes

# Default training length (``train(max_epochs=None)``), docs/user_guide.md "Training length":
# steps = clip(round(PASSES * min(n_cells, CELLS_CAP) / cells_per_step), MIN_STEPS, MAX_STEPS)
DEFAULT_PASSES = 150  # expected times each cell is in a training step, up to CELLS_CAP cells
CELLS_CAP = 20_000  # beyond it, fewer passes (scVI: 400 epochs up to 20,000 cells, then fewer)
MIN_STEPS = 500  # optimiser steps at least, however small the data
MAX_STEPS = 10_000  # and at most, however large
KL_WARMUP_SHARE = 0.75  # from-scratch KL warm-up: this share of the run's steps
MAX_KL_WEIGHT = 0.5  # from-scratch KL weight after the warm-up (scvi-tools' max_kl_weight)


class TissueTrainRunner(TrainRunner):
    """scvi-tools' runner, plus the step checkpoints of ``train(checkpoint_every_n_steps=N)``.

    Parameters
    ----------
    *args, **trainer_kwargs
        As :class:`scvi.train.TrainRunner`.
    checkpoint_every_n_steps, checkpoint_dir
        See :meth:`TrainingMixin.train`.
    """

    def __init__(
        self,
        *args,
        checkpoint_every_n_steps: int | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        **trainer_kwargs,
    ):
        super().__init__(*args, **trainer_kwargs)
        needs_validation = (
            trainer_kwargs.get("early_stopping")
            or trainer_kwargs.get("check_val_every_n_epoch")
            or getattr(self.training_plan, "reduce_lr_on_plateau", False)
        )
        if needs_validation and getattr(self.data_splitter, "n_val", 1) == 0:
            raise ValueError(
                "Validation was requested (early_stopping, check_val_every_n_epoch or "
                "reduce_lr_on_plateau) but no cell is left for validation: lower train_size "
                "(tissues of fewer than 10 cells are never split: they train whole)."
            )
        if checkpoint_every_n_steps is not None:
            # after the trainer is built: Lightning refuses a ModelCheckpoint in `callbacks=`
            # while scvi-tools passes enable_checkpointing=False
            checkpoint = step_checkpoint(checkpoint_every_n_steps, checkpoint_dir)
            self.trainer.callbacks.append(checkpoint)


class TrainingMixin(UnsupervisedTrainingMixin):
    """Training on tissue minibatches (scvi-tools' ``train`` with CellPLM's arguments)."""

    _train_runner_cls = TissueTrainRunner

    @quiet_training()  # Lightning's hints and two foreign warnings (see cellplm_scvi._quiet)
    def train(
        self,
        max_epochs: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        load_sparse_tensor: bool | None = None,
        batch_size: int | None = 4000,
        early_stopping: bool = False,
        datasplitter_kwargs: dict | None = None,
        plan_config=None,
        plan_kwargs: dict | None = None,
        datamodule=None,
        trainer_config=None,
        lr: float | None = None,
        drop_node_rate: float = 0.3,
        gradient_clip_val: float | None = 2.0,
        max_cells_per_step: int | None = None,
        redraw_tissues: bool | int | None = None,
        pack_tissues: bool = False,
        checkpoint_every_n_steps: int | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        ckpt_path: str | os.PathLike | None = None,
        **trainer_kwargs,
    ):
        """Train on tissue minibatches with scvi-tools' Lightning trainer.

        The arguments are scvi-tools' (:meth:`scvi.model.SCVI.train`), with CellPLM's meaning
        where a minibatch is a tissue.

        Parameters
        ----------
        max_epochs
            Passes over the training tissues; an epoch is one optimiser step per training
            tissue (docs/user_guide.md, "Training length"). ``None``: the default length,
            ``clip(round(150 * min(n_cells, 20000) / cells_per_step), 500, 10000)`` steps
            (``default_train_steps``) in whole epochs; with a ``datamodule``, scvi-tools'
            heuristic on its ``n_obs``. A from-scratch ``"vae"`` latent's KL weight rises to 0.5
            over the first 75% of the run (scvi-tools' ``n_steps_kl_warmup`` and
            ``max_kl_weight``, unless ``plan_kwargs`` sets them or ``n_epochs_kl_warmup``).
        accelerator, devices
            Lightning device selection (``"auto"`` uses one GPU when there is one).
        train_size, validation_size
            Fractions of cells for training and validation, taken within every tissue
            (validation cells stay in their tissue as context and only leave the loss; tissues
            of fewer than 10 cells train whole). ``datasplitter_kwargs={"split_by":
            "tissues"}`` holds out whole tissues instead.
        shuffle_set_split
            Shuffle cells before splitting them (``False``: in row order).
        load_sparse_tensor
            CellPLM always loads counts as sparse CSR tensors: ``None`` (default) or ``True``;
            ``False`` raises.
        batch_size
            Cap on cells per training step: larger tissues are subsampled at each step
            (official ``max_batch_size``); a positive int. ``None``: whole tissues.
        early_stopping
            Stop on ``early_stopping_monitor`` (default ``"elbo_validation"``, as in scVI).
            ``early_stopping_patience`` counts epochs, and an epoch here is one optimiser step
            per training tissue (not a pass over cells in minibatches of 128): with few
            tissues, raise the patience or check ``check_val_every_n_epoch``.
        datasplitter_kwargs
            Passed to :class:`~cellplm_scvi.data.TissueDataSplitter`; a fixed split is
            ``{"split_key": column}`` (an ``adata.obs`` column of ``"train"``/``"validation"``/
            ``"test"``). scvi-tools' ``external_indexing`` is refused with that advice.
        plan_config, plan_kwargs
            Passed (merged) to :class:`CellPLMTrainingPlan`, e.g. ``weight_decay``,
            ``n_steps_lr_warmup``, ``reduce_lr_on_plateau``.
        datamodule
            A Lightning data module yielding tissue minibatches (e.g. a
            :class:`~cellplm_scvi.data.TissueCorpus`), used instead of the AnnData's splitter.
            Its own settings apply: ``batch_size``, ``train_size``, ``validation_size``,
            ``shuffle_set_split``, ``drop_node_rate`` and ``datasplitter_kwargs`` are not
            forwarded to it (scvi-tools 1.5 would call its ``set_batch_size``/``set_split``,
            which CellPLM's data modules do not define).
        trainer_config
            Passed (merged) to :class:`scvi.train.Trainer`, like ``**trainer_kwargs``.
        lr
            AdamW learning rate (linear warm-up, see :class:`CellPLMTrainingPlan`). ``None``:
            the preset's (2e-3 for ``"dissociated"``, else 5e-4).
        drop_node_rate
            Fraction of a tissue's cells dropped at each step (official node drop).
        gradient_clip_val
            Gradient norm clipping (official fine-tuning: 2.0).
        max_cells_per_step
            Alias of ``batch_size``.
        redraw_tissues
            Train on local tissues drawn anew every epoch (random Voronoi regions of the
            coordinates within each slide, of the registered tissues' mean size, or of this
            many cells for an int; see
            :class:`~cellplm_scvi.data.TissueBatchSampler`), so no cell always sits at a tissue
            border; validation and inference use the registered tissues. ``None``: on for a
            model of the ``"spatial"`` preset whose slides are known
            (``setup_anndata(library_key=...)``, or computed tissues without it: one slide);
            with ``tissue_key`` and no ``library_key``, or the ``"official"`` preset, off.
        pack_tissues
            Put several whole tissues in one training step, ``batch_size`` cells at most in all
            (each tissue capped at it), instead of one tissue per step: faster with small
            tissues. Attention stays within each tissue, each tissue is masked and spatially
            scaled alone, and the step's loss is the mean of the per-tissue losses (each with
            its own free-bits floors), so packing changes which tissues share an optimizer
            step, not what is computed for a tissue. Steps per epoch drop about
            ``batch_size / mean tissue size`` times (scale step-based schedules such as
            ``n_steps_lr_warmup`` accordingly). Validation reads one tissue per step. Keeps the
            registered tissues (``redraw_tissues=None`` means off; ``True`` raises). With
            ``datamodule=``, set it on the data module instead
            (:class:`~cellplm_scvi.data.TissueCorpus` ``pack_tissues``).
        checkpoint_every_n_steps
            Write a Lightning checkpoint every N optimiser steps (weights, AdamW moments,
            learning-rate schedulers, global step, the KL warm-up counter, random generators
            and, with a :class:`~cellplm_scvi.data.TissueCorpus`, the place in the epoch), as
            ``<checkpoint_dir>/last.ckpt``. scvi-tools' own ``enable_checkpointing`` saves
            weights only at validation; this is the one to resume from.
        checkpoint_dir
            Folder of those checkpoints (default: ``<scvi.settings.logging_dir>/
            cellplm_checkpoints``); under several nodes, on a shared file system.
        ckpt_path
            Resume from this Lightning checkpoint (scvi-tools' ``ckpt_path``, passed to
            ``Trainer.fit``), or ``"last"``: the newest ``last.ckpt`` in ``checkpoint_dir`` if
            there is one, else a fresh start (so the same command both starts and resumes a
            run). Call it on a model built as the crashed one was, with the same data and
            ``max_epochs``: the run continues at the saved step, and a corpus epoch continues
            with the tissues it had not reached (see ``docs/pretraining.md``).
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (e.g. ``strategy="ddp"``,
            ``check_val_every_n_epoch``).

        Raises
        ------
        ValueError
            On a minified AnnData (``minify_adata()`` dropped the counts), counts that are no
            longer raw (a random sample of cells is checked, as at ``setup_anndata``), tissues
            rewritten by a later ``setup_anndata`` with other arguments, a ``batch_size`` that is
            not a positive int, or ``datasplitter_kwargs["external_indexing"]``.
        """
        check_train_arguments(batch_size, max_cells_per_step)
        if datamodule is None:
            check_training_data(self, datasplitter_kwargs)
        if max_cells_per_step is not None:
            if batch_size not in (None, 4000, max_cells_per_step):
                raise ValueError("Pass batch_size or its alias max_cells_per_step, not both.")
            batch_size = max_cells_per_step
        if pack_tissues:
            if datamodule is not None:
                raise ValueError(
                    "pack_tissues applies to the AnnData's tissue splitter; with datamodule= set "
                    "it on the data module (e.g. TissueCorpus(..., max_cells_per_step=8000, "
                    "pack_tissues=True))."
                )
            if batch_size is None:
                raise ValueError(
                    "pack_tissues=True needs a cell budget per step: pass batch_size (or "
                    "max_cells_per_step), e.g. 4000."
                )
            if redraw_tissues:
                raise ValueError(
                    "pack_tissues=True and redraw_tissues=True cannot be combined: redrawn "
                    "tissues change size every epoch, and so would the number of packed steps."
                )
            redraw_tissues = False
        steps_per_epoch = None  # known for the AnnData's tissues, not for a data module
        if datamodule is None and self.adata is not None:
            cells_per_step, steps_per_epoch = tissue_steps(
                self.adata_manager.get_from_registry(TISSUE_KEY), batch_size, pack_tissues
            )
            if max_epochs is None:
                steps = default_train_steps(self.adata.n_obs, cells_per_step)
                max_epochs = math.ceil(steps / steps_per_epoch)
        if max_epochs is None:
            n_obs = getattr(datamodule, "n_obs", None)
            if n_obs is None:
                raise ValueError("Pass max_epochs with a datamodule that has no n_obs.")
            max_epochs = get_max_epochs_heuristic(n_obs)
        trainer_kwargs = merge_kwargs(trainer_config, trainer_kwargs, name="trainer")
        if ckpt_path is None:  # scvi-tools' spelling: inside the trainer arguments
            ckpt_path = trainer_kwargs.pop("ckpt_path", None)
        check_resume_arguments(checkpoint_every_n_steps, checkpoint_dir, ckpt_path)
        if ckpt_path is not None:
            trainer_kwargs["ckpt_path"] = ckpt_path  # TrainRunner hands it to Trainer.fit
        if checkpoint_every_n_steps is not None:  # to TissueTrainRunner
            trainer_kwargs["checkpoint_every_n_steps"] = checkpoint_every_n_steps
            trainer_kwargs["checkpoint_dir"] = checkpoint_dir
        if use_distributed_sampler(trainer_kwargs.get("strategy")):
            trainer_kwargs.setdefault("use_distributed_sampler", False)  # our sampler shards
        datasplitter_kwargs = dict(datasplitter_kwargs or {})
        if "batch_size" in datasplitter_kwargs:
            raise ValueError(
                "batch_size in datasplitter_kwargs is not read: the cells per training step are "
                "train(batch_size=...) (max_cells_per_step of the splitter)."
            )
        load_sparse_tensor = datasplitter_kwargs.pop("load_sparse_tensor", load_sparse_tensor)
        check_loader_options(False, load_sparse_tensor, None)
        if datamodule is None:  # the AnnData's splitter; batch_size is its cell budget per step
            setup_args = self.adata_manager.registry["setup_args"]
            defaults = {
                "max_cells_per_step": batch_size,
                "drop_node_rate": drop_node_rate,
                "redraw_tissues": resolve_redraw_tissues(self._preset, setup_args, redraw_tissues),
                **({"pack_tissues": True} if pack_tissues else {}),
                "gene_layout": self._gene_layout,  # how the AnnData's columns meet the vocabulary
            }
            datamodule = self._data_splitter_cls(
                self.adata_manager,
                train_size=train_size,
                validation_size=validation_size,
                shuffle_set_split=shuffle_set_split,
                distributed_sampler=use_distributed_sampler(trainer_kwargs.get("strategy")),
                load_sparse_tensor=load_sparse_tensor,
                **{**defaults, **datasplitter_kwargs},
            )
        else:
            check_datamodule(self, datamodule)
        lr = self._preset.lr if lr is None else lr
        plan_kwargs = {
            "lr": lr, "lr_decay_share": self._preset.lr_decay_share,
            **merge_kwargs(plan_config, plan_kwargs, name="plan"),
        }  # fmt: skip
        plan_kwargs = kl_warmup_kwargs(self, plan_kwargs, max_epochs, steps_per_epoch)
        if gradient_clip_val is not None:
            trainer_kwargs.setdefault("gradient_clip_val", gradient_clip_val)
        if early_stopping:
            trainer_kwargs.setdefault("early_stopping_monitor", "elbo_validation")
        if plan_kwargs.get("reduce_lr_on_plateau"):
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        self.module.train()  # inference calls leave the module in eval mode
        # scvi-tools extends only the keys already in `history_`. A model trained elsewhere
        # (official weights, or a query built from them) has none yet: this run starts it.
        starts_history = self.is_trained_ and not self.history_
        if starts_history:
            self.is_trained_ = False
        try:
            return super().train(
                max_epochs=max_epochs,
                accelerator=accelerator,
                devices=devices,
                train_size=train_size,
                validation_size=validation_size,
                shuffle_set_split=shuffle_set_split,
                load_sparse_tensor=load_sparse_tensor,
                batch_size=batch_size,
                early_stopping=early_stopping,
                datasplitter_kwargs=datasplitter_kwargs,
                plan_kwargs=plan_kwargs,
                datamodule=datamodule,
                **trainer_kwargs,
            )
        finally:
            self.is_trained_ = self.is_trained_ or starts_history


def default_train_steps(n_cells: int, cells_per_step: float) -> int:
    """Optimiser steps of ``train(max_epochs=None)``.

    ``clip(round(DEFAULT_PASSES * min(n_cells, CELLS_CAP) / cells_per_step), MIN_STEPS,
    MAX_STEPS)``: every cell in about ``DEFAULT_PASSES`` training steps up to ``CELLS_CAP``
    cells, as many steps as for ``CELLS_CAP`` cells beyond (fewer passes, as scVI's default
    epochs), within ``[MIN_STEPS, MAX_STEPS]`` steps (docs/user_guide.md, "Training length").

    Parameters
    ----------
    n_cells
        Cells of the AnnData.
    cells_per_step
        Mean cells of a training step (see :func:`tissue_steps`).

    Returns
    -------
    The number of optimiser steps.
    """
    if n_cells < 1 or not cells_per_step > 0:
        raise ValueError(
            f"default_train_steps needs n_cells >= 1 and cells_per_step > 0, got {n_cells} and "
            f"{cells_per_step}."
        )
    steps = round(DEFAULT_PASSES * min(n_cells, CELLS_CAP) / cells_per_step)
    return int(min(max(steps, MIN_STEPS), MAX_STEPS))


def tissue_steps(
    tissue_codes: np.ndarray, batch_size: int | None, pack_tissues: bool = False
) -> tuple[float, int]:
    """Mean cells of a training step and steps of an epoch, for the registered tissues.

    A step holds one tissue, capped at ``batch_size`` cells (``pack_tissues``: several capped
    tissues, ``batch_size`` cells in all, so ``ceil(capped cells / batch_size)`` steps). Every
    tissue trains under the default split by cells; on one device.
    """
    _, sizes = np.unique(np.asarray(tissue_codes).reshape(-1), return_counts=True)
    capped = np.minimum(sizes, batch_size) if batch_size else sizes
    steps_per_epoch = math.ceil(capped.sum() / batch_size) if pack_tissues else len(sizes)
    return float(capped.sum() / steps_per_epoch), int(steps_per_epoch)


def kl_warmup_kwargs(
    model, plan_kwargs: dict, max_epochs: int, steps_per_epoch: int | None
) -> dict:
    """``plan_kwargs`` with the default KL warm-up of this run.

    A from-scratch ``"vae"`` latent (a model outside the ``"official"`` preset, whose latent
    has no warm-up of its own: :func:`~cellplm_scvi.model._presets.module_defaults`) gets
    scvi-tools' ``n_steps_kl_warmup``: the first ``KL_WARMUP_SHARE`` of the run's steps
    (``n_epochs_kl_warmup``, of its epochs, with a data module), up to a weight of
    ``MAX_KL_WEIGHT`` (scvi-tools' ``max_kl_weight``). Given ``n_steps_kl_warmup``,
    ``n_epochs_kl_warmup`` or ``max_kl_weight`` are kept. The ``"official"`` preset
    (:meth:`load_official`) keeps the official schedule (10,000 steps, in the latent layer), a
    latent given its own ``kl_warmup_steps`` keeps it, and a Gaussian-mixture latent
    (official: free-bits floors, no warm-up) gets none added.
    """
    layer = model.module.latent.layers[1]
    own_schedule = not isinstance(layer, VAELatent) or layer.kl_warmup_steps
    if model._preset.name == "official" or own_schedule:
        return plan_kwargs
    plan_kwargs = {"max_kl_weight": MAX_KL_WEIGHT, **plan_kwargs}
    if "n_steps_kl_warmup" in plan_kwargs or "n_epochs_kl_warmup" in plan_kwargs:
        return plan_kwargs
    if steps_per_epoch is None:
        return {**plan_kwargs, "n_epochs_kl_warmup": max(1, round(KL_WARMUP_SHARE * max_epochs))}
    steps = max(1, round(KL_WARMUP_SHARE * max_epochs * steps_per_epoch))
    return {**plan_kwargs, "n_steps_kl_warmup": steps}


def check_train_arguments(batch_size: int | None, max_cells_per_step: int | None) -> None:
    """Refuse cell budgets that would otherwise be misread (``load_sparse_tensor`` is checked
    with the other loader options, :func:`~cellplm_scvi._validation.check_loader_options`)."""
    check_batch_size(batch_size, "batch_size")
    check_batch_size(max_cells_per_step, "max_cells_per_step")


def check_training_data(model, datasplitter_kwargs: dict | None) -> None:
    """What ``train()`` checks of the model's AnnData before scvi-tools builds the splitter."""
    if model.minified_data_type is not None:
        raise ValueError(
            "train() needs counts, and this model's AnnData is minified (minify_adata() replaced "
            "them by latent posteriors). Train before minifying, or load the model with the full "
            "AnnData (CellPLM.load(dir_path, adata=full_adata)) and train that."
        )
    if datasplitter_kwargs and "external_indexing" in datasplitter_kwargs:
        raise ValueError(
            "datasplitter_kwargs['external_indexing'] (scvi-tools' fixed split) is not supported: "
            "CellPLM splits cells within their tissues. Write the split into an adata.obs column "
            "of 'train'/'validation'/'test' and pass datasplitter_kwargs={'split_key': column}."
        )
    if model.adata is None:  # a registry-built model without a data module: scvi-tools raises
        return
    check_tissue_codes(model.adata_manager, model.adata)
    check_counts_sample(model.adata, model.adata_manager.registry["setup_args"]["layer"])


def check_datamodule(model, datamodule) -> None:
    """A :class:`~cellplm_scvi.data.TissueCorpus` yields vocabulary columns (its minibatches
    carry no gene layout): its vocabulary must be the model's, in order. A
    :class:`~cellplm_scvi.data.TissueDataSplitter` of the model's AnnData gets its gene layout
    unless it was given one."""
    from ..data import TissueCorpus, TissueDataSplitter

    if isinstance(datamodule, TissueDataSplitter) and model.adata is not None:
        if datamodule.adata_manager is model.adata_manager:
            datamodule.loader_kwargs.setdefault("gene_layout", model._gene_layout)
    if not isinstance(datamodule, TissueCorpus):
        return
    vocabulary = model_vocabulary(model)
    if list(datamodule.vocabulary) != vocabulary:
        raise ValueError(
            f"The corpus' vocabulary ({len(datamodule.vocabulary)} genes) is not the model's "
            f"({len(vocabulary)} genes, in order): build the corpus with "
            "TissueCorpus(files, vocabulary=<the model's vocabulary>), e.g. "
            "vocabulary='20230926_85M' for the official 85M checkpoints."
        )


def step_checkpoint(every_n_steps: int, dirpath: str | os.PathLike | None) -> ModelCheckpoint:
    """A Lightning ``ModelCheckpoint`` that writes ``<dirpath>/epoch=E-step=S.ckpt`` every
    ``every_n_steps`` optimiser steps, removes the previous one once the new one is written, and
    points ``<dirpath>/last.ckpt`` (a symbolic link, a copy where links are not allowed) at it:
    one checkpoint on disk, and a crash while it is written leaves the previous one readable."""
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ValueError(
            f"checkpoint_every_n_steps must be a positive int, got {every_n_steps!r}."
        )
    if dirpath is None:
        dirpath = Path(settings.logging_dir) / "cellplm_checkpoints"
    return ModelCheckpoint(
        dirpath=os.fspath(dirpath),
        filename="{epoch}-{step}",
        every_n_train_steps=every_n_steps,
        save_top_k=1,  # no monitor: the newest step checkpoint
        save_last="link",
        save_on_train_epoch_end=False,
    )


def check_resume_arguments(every_n_steps: int | None, checkpoint_dir, ckpt_path) -> None:
    """Refuse combinations that would silently do nothing."""
    if checkpoint_dir is not None and every_n_steps is None:
        raise ValueError(
            "checkpoint_dir is set but checkpoint_every_n_steps is not: pass "
            "checkpoint_every_n_steps=N to write checkpoints there."
        )
    if ckpt_path == "last" and every_n_steps is None:
        raise ValueError(
            'ckpt_path="last" looks for the last checkpoint of this run\'s checkpointing: pass '
            "checkpoint_every_n_steps=N and the checkpoint_dir of the crashed run, or give the "
            "path of a .ckpt file."
        )
    if ckpt_path not in (None, "last") and not os.path.isfile(os.fspath(ckpt_path)):
        raise ValueError(
            f"ckpt_path={ckpt_path!r} is not a file; pass a Lightning .ckpt file written by "
            'train(checkpoint_every_n_steps=...), or "last".'
        )
