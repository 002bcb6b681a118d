"""Checkpoints every N training steps, and resume after a crash, under scvi-tools' trainer.

scvi-tools' :class:`~scvi.train.Trainer` passes ``enable_checkpointing=False`` to Lightning
unless asked, and when asked (``enable_checkpointing=True``) it adds its own
:class:`~scvi.train.SaveCheckpoint`: a ``model.save`` directory per validation epoch that holds
weights only (no optimiser, scheduler or loop state: nothing to resume from), and that forces
validation every epoch. A plain Lightning ``ModelCheckpoint`` in ``callbacks=`` with the default
``enable_checkpointing=False`` is refused by Lightning ("found ModelCheckpoint in callbacks
list"). So :meth:`CellPLM.train` builds the trainer as scvi-tools does, then adds a Lightning
``ModelCheckpoint(every_n_train_steps=N, save_last=True)`` to its callbacks; ``ckpt_path`` goes
to ``Trainer.fit`` through scvi-tools' :class:`~scvi.train.TrainRunner` (1.4 and 1.5 both pop
it from the trainer arguments and pass it to ``fit``).

A Lightning checkpoint holds the training plan's ``state_dict`` (module weights and buffers:
the VAE latent's KL warm-up counter ``kl_step_count``), AdamW's moments, the learning-rate
schedulers, the loops (global step, epoch, batch within the epoch), the training loader's
``state_dict`` (:class:`~cellplm_scvi.data._resume.ResumableLoader`: the tissue sampler's
place in the epoch) and what :class:`~cellplm_scvi.model.CellPLMTrainingPlan` adds (random
number generators, official plateau scheduler, best validation state).
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from scvi import settings


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
