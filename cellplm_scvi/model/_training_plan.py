"""Training plan: scvi's TrainingPlan with AdamW, a learning-rate warm-up (and, for the
from-scratch presets, a fall over the last steps) and an optional smaller learning rate for the
gene embedder (official fine-tuning recipe)."""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from scvi.train import TrainingPlan
from torch.optim.lr_scheduler import LambdaLR

from .._constants import LABELS_KEY
from ..nn import GMVAELatent

CHECKPOINT_KEY = "cellplm_training_plan"  # what this plan adds to a Lightning checkpoint
SCANVI_METRICS = (  # scvi-tools' SemiSupervisedTrainingPlan names, logged with a head
    "validation_classification_loss",
    "validation_accuracy",
    "validation_f1_score",
    "validation_calibration_error",
)


def _numpy_rng_state() -> tuple:
    """NumPy's legacy global generator state as tensors and numbers: Lightning (torch >= 2.6)
    reads checkpoints with ``weights_only=True``, which refuses numpy arrays."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (the global one)
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)


def _set_numpy_rng_state(state: tuple) -> None:
    name, keys, pos, has_gauss, gauss = state
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002


def lr_factor(step: int, n_warmup: int, n_decay: int, n_steps: float, floor: float = 0.1) -> float:
    """Learning-rate factor at ``step``: linear warm-up over the first ``n_warmup`` steps, then
    over the last ``n_decay`` of ``n_steps`` a linear fall to ``floor``."""
    factor = min(1.0, (step + 1) / n_warmup) if n_warmup else 1.0
    start = n_steps - n_decay
    if n_decay and step >= start:
        factor *= max(floor, 1.0 - (1.0 - floor) * (step - start) / n_decay)
    return factor


class CellPLMTrainingPlan(TrainingPlan):
    """:class:`~scvi.train.TrainingPlan` for CellPLM.

    Parameters
    ----------
    module
        The :class:`~cellplm_scvi.module.CellPLMModule`.
    lr
        Peak AdamW learning rate.
    weight_decay
        AdamW weight decay.
    n_steps_lr_warmup
        Steps of linear learning-rate warm-up (transformers train badly at full rate from
        step one).
    lr_decay_share
        Share of the run's last steps over which the learning rate falls linearly to 10% of
        ``lr`` (0: none; :meth:`~cellplm_scvi.CellPLM.train` passes the preset's). Not with
        ``reduce_lr_on_plateau``.
    embedder_lr_factor
        Learning rate of the embedder relative to ``lr`` (official fine-tuning: 0.1).
    n_epochs_kl_warmup
        scvi-tools' KL annealing over epochs (``n_steps_kl_warmup``, over steps, goes through
        ``**kwargs``). Off here by default; :meth:`~cellplm_scvi.CellPLM.train` sets
        ``n_steps_kl_warmup`` (75% of the run) and ``max_kl_weight`` (0.5) for a
        from-scratch ``"vae"`` latent (user guide, "Training length"). The official latents
        keep their own regularisation: free-bits floors, and the official VAE's warm-up
        (``kl_warmup_steps``), which multiplies it.
    embedder_weight_decay
        Weight decay of the embedder group (official annotation: 1e-10).
    optimized_modules
        Names of the module's children that the optimiser holds (official annotation:
        embedder, encoder, latent and head; the pre-latent norm and decoder stay fixed).
        ``None``: all trainable parameters.
    n_epochs_lr_warmup, lr_warmup_groups
        Official epoch-wise warm-up: at the start of epoch ``e < n_epochs_lr_warmup`` the
        learning rate of the warmed groups is set to ``lr * (e + 1) / n_epochs_lr_warmup``
        (``"rest"``: all groups but the embedder's, official annotation; ``"all"``: official
        imputation).
    plateau
        The official ``torch.optim.lr_scheduler.ReduceLROnPlateau`` on the training loss:
        ``{"factor": 0.95, "patience": 25, "interval": "step"}`` (annotation: stepped after
        every optimiser step on its loss) or ``"interval": "epoch"`` (imputation: on the
        epoch's mean training loss).
    keep_best_state
        ``"validation_f1"`` (macro-F1 of the head on the validation cells, highest) or
        ``"validation_loss"`` (lowest): the module's state after the best validation epoch is
        kept in memory and loaded at the end of training (a later tie replaces it, as in the
        official loop). Needs validation every epoch.
    **kwargs
        Passed to :class:`~scvi.train.TrainingPlan`, e.g. ``reduce_lr_on_plateau=True`` with
        ``lr_factor``, ``lr_patience``, ``lr_threshold``, ``lr_min`` and
        ``lr_scheduler_metric`` (scvi-tools' plateau scheduler, stepped after each validation
        epoch; the warm-up then runs before it, and the plateau scheduler owns the rate after).

    Notes
    -----
    ``embedder_weight_decay``, ``optimized_modules``, ``n_epochs_lr_warmup``,
    ``lr_warmup_groups``, ``plateau`` and ``keep_best_state`` are the official fine-tuning
    pipelines' optimisation (see :func:`cellplm_scvi.model.annotation_recipe`); all are off
    by default.
    """

    def __init__(
        self,
        module,
        *,
        lr: float = 5e-4,
        weight_decay: float = 1e-6,
        n_steps_lr_warmup: int = 50,
        lr_decay_share: float = 0.0,
        embedder_lr_factor: float = 1.0,
        n_epochs_kl_warmup: int | None = None,
        embedder_weight_decay: float | None = None,
        optimized_modules: Sequence[str] | None = None,
        n_epochs_lr_warmup: int = 0,
        lr_warmup_groups: Literal["all", "rest"] = "all",
        plateau: dict | None = None,
        keep_best_state: Literal["validation_f1", "validation_loss"] | None = None,
        **kwargs,
    ):
        kwargs.setdefault("optimizer", "AdamW")
        kwargs.setdefault("eps", 1e-8)  # scvi defaults to 0.01, too large for a transformer
        super().__init__(
            module,
            lr=lr,
            weight_decay=weight_decay,
            n_epochs_kl_warmup=n_epochs_kl_warmup,
            **kwargs,
        )
        if not 0 <= lr_decay_share <= 1:
            raise ValueError(f"lr_decay_share must be in [0, 1], got {lr_decay_share!r}.")
        self.n_steps_lr_warmup, self.lr_decay_share = n_steps_lr_warmup, lr_decay_share
        self.embedder_lr_factor = embedder_lr_factor
        self.embedder_weight_decay = embedder_weight_decay
        self.optimized_modules = None if optimized_modules is None else tuple(optimized_modules)
        if self.optimized_modules is not None:
            children = dict(module.named_children())
            unknown = [name for name in self.optimized_modules if name not in children]
            if unknown:
                raise ValueError(
                    f"optimized_modules has names that are not parts of the module: {unknown}; "
                    f"its parts are {list(children)}."
                )
        if lr_warmup_groups not in ("all", "rest"):
            raise ValueError(
                f"lr_warmup_groups must be 'all' or 'rest', got {lr_warmup_groups!r}."
            )
        self.n_epochs_lr_warmup, self.lr_warmup_groups = n_epochs_lr_warmup, lr_warmup_groups
        self.plateau = None if plateau is None else {"interval": "step", **plateau}
        if self.plateau is not None and self.plateau["interval"] not in ("step", "epoch"):
            raise ValueError("plateau['interval'] must be 'step' or 'epoch'.")
        if keep_best_state not in (None, "validation_f1", "validation_loss"):
            raise ValueError(
                "keep_best_state must be None, 'validation_f1' or 'validation_loss', got "
                f"{keep_best_state!r}."
            )
        self.keep_best_state = keep_best_state
        self.best_state, self.best_epoch, self.best_score = None, None, None
        self._val_predictions: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._epoch_losses: list[float] = []
        self._val_losses: list[float] = []
        # parameters this run never differentiates (e.g. an official checkpoint's pretraining
        # covariate tables): frozen, or plain `strategy="ddp"` stops on unused parameters
        for name in module.unused_parameter_names():
            module.get_parameter(name).requires_grad_(False)

    def configure_optimizers(self):
        """AdamW over trainable parameters (embedder at ``lr * embedder_lr_factor``) and a
        per-step linear warm-up."""
        embedder_ids = {id(p) for p in self.module.embedder.parameters()}
        params = self.module.parameters()
        if self.optimized_modules is not None:
            params = [
                p
                for n in self.optimized_modules
                for p in self.module.get_submodule(n).parameters()
            ]
        rest, embedder, no_decay = [], [], []
        for p in params:
            if not p.requires_grad:
                continue
            if getattr(p, "no_weight_decay", False):  # query tables: frozen rows must not decay
                no_decay.append(p)
            elif id(p) in embedder_ids:
                embedder.append(p)
            else:
                rest.append(p)
        groups = [{"params": rest}]
        if embedder:
            group = {"params": embedder, "lr": self.lr * self.embedder_lr_factor}
            if self.embedder_weight_decay is not None:
                group["weight_decay"] = self.embedder_weight_decay
            groups.append(group)
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        optimizer = self.get_optimizer_creator()(groups)
        for group in optimizer.param_groups:
            group["target_lr"] = group["lr"]  # the official warm-up ramps towards it
            group["is_embedder"] = any(id(p) in embedder_ids for p in group["params"])
        config = {"optimizer": optimizer}
        if self.plateau is not None:  # official: stepped by hand on the training loss
            options = {k: v for k, v in self.plateau.items() if k != "interval"}
            self.official_plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, "min", **options
            )
        if self.reduce_lr_on_plateau:  # warm-up in `on_train_batch_start`, then the plateau
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer,
                patience=self.lr_patience,
                factor=self.lr_factor,
                threshold=self.lr_threshold,
                min_lr=self.lr_min,
                threshold_mode="abs",
            )
            config["lr_scheduler"] = {
                "scheduler": plateau,
                "monitor": self.lr_scheduler_metric,
                "interval": "epoch",
            }
        elif self.n_steps_lr_warmup or self.lr_decay_share:
            scheduler = LambdaLR(optimizer, lambda step: self._lr_factor(step))
            config["lr_scheduler"] = {"scheduler": scheduler, "interval": "step"}
        return config

    def _lr_factor(self, step: int) -> float:
        """:func:`lr_factor` of this run. Its length is read when the step is taken: Lightning
        counts the training batches after the optimisers are built (before that, and for a run
        of unknown length, there is no fall)."""
        trainer = self.trainer
        n_steps = math.inf
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            batches = trainer.num_training_batches // trainer.accumulate_grad_batches
            n_steps = trainer.max_epochs * batches
        if trainer.max_steps is not None and trainer.max_steps > 0:
            n_steps = min(n_steps, trainer.max_steps)
        n_decay = round(self.lr_decay_share * n_steps) if math.isfinite(n_steps) else 0
        return lr_factor(step, self.n_steps_lr_warmup, n_decay, n_steps)

    def on_before_optimizer_step(self, optimizer):
        """Floored GMVAE prior nets: exactly-zero (all-reduced) gradients -> ``None``, so AdamW
        neither moves nor decays them (as in the official code)."""
        for layer in self.module.modules():
            if isinstance(layer, GMVAELatent):
                layer.drop_floored_gradients()

    def on_train_epoch_start(self):
        """Official epoch-wise warm-up (``n_epochs_lr_warmup``)."""
        epoch = self.current_epoch
        if epoch >= self.n_epochs_lr_warmup:
            return
        for group in self.trainer.optimizers[0].param_groups:
            if self.lr_warmup_groups == "rest" and group["is_embedder"]:
                continue
            group["lr"] = group["target_lr"] * (epoch + 1) / self.n_epochs_lr_warmup

    def on_train_batch_end(self, outputs, batch, batch_idx):
        """Official plateau scheduler: stepped on each step's loss (or collected per epoch)."""
        if self.plateau is None:
            return
        loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
        if self.plateau["interval"] == "step":
            self.official_plateau.step(loss)
        else:
            self._epoch_losses.append(loss)

    def on_train_epoch_end(self):
        """Official per-epoch plateau step on the epoch's mean training loss."""
        if self.plateau is not None and self.plateau["interval"] == "epoch" and self._epoch_losses:
            self.official_plateau.step(sum(self._epoch_losses) / len(self._epoch_losses))
        self._epoch_losses = []

    def forward(self, *args, **kwargs):
        """The module's forward; keeps the inference outputs of validation steps (head F1)."""
        outputs = super().forward(*args, **kwargs)
        self._last_inference, self._last_loss = outputs[0], outputs[2]
        return outputs

    def validation_step(self, batch, batch_idx):
        """scvi-tools' validation step; with a head, also collects its predictions on the
        validation cells (labelled rows inside the ``"loss_mask"``) for ``validation_f1``."""
        super().validation_step(batch, batch_idx)
        self._val_losses.append(float(self._last_loss.loss))
        module = self.module
        if module.classifier is None or LABELS_KEY not in batch:
            return
        labels = batch[LABELS_KEY].view(-1).long()
        rows = labels < module.n_labels
        in_loss = module.loss_rows(batch)
        if in_loss is not None:
            rows = rows & in_loss.to(rows.device)
        logits = self._last_inference["logits"]
        self._val_predictions.append((logits[rows].float().cpu(), labels[rows].cpu()))

    def on_validation_epoch_end(self):
        """Log the head's validation metrics and keep the best state.

        ``validation_f1``: torchmetrics' macro-F1, the official metric. scvi-tools' SCANVI
        names with its definitions (torchmetrics, micro-averaged): ``validation_accuracy``,
        ``validation_f1_score``, ``validation_calibration_error`` (15 bins, L1) and
        ``validation_classification_loss`` (mean cross-entropy). All are computed over the
        epoch's validation cells together (SCANVI averages per-minibatch values).
        """
        scores = {}
        if self._val_losses:  # official: the mean over validation steps
            scores["validation_loss"] = sum(self._val_losses) / len(self._val_losses)
        if self._val_predictions:
            logits, true = (torch.cat(t) for t in zip(*self._val_predictions))
            if len(true):
                scores.update(self._classification_scores(logits, true))
                self.log("validation_f1", scores["validation_f1"], on_epoch=True, prog_bar=True)
                for name in SCANVI_METRICS:
                    self.log(name, scores[name], on_epoch=True)
        self._val_losses, self._val_predictions = [], []
        if self.keep_best_state is None or self.trainer.sanity_checking:
            return
        value = scores.get(self.keep_best_state)
        if value is None:
            raise ValueError(
                f"keep_best_state={self.keep_best_state!r} but no such validation metric: it "
                "needs validation cells (split_by='cells' or validation tissues) and, for "
                "'validation_f1', a classification head."
            )
        score = float(value) if self.keep_best_state == "validation_f1" else -float(value)
        if self.best_score is None or score >= self.best_score:  # official: ties replace
            self.best_score, self.best_epoch = score, self.current_epoch
            self.best_state = copy.deepcopy(self.module.state_dict())

    def _classification_scores(self, logits: torch.Tensor, true: torch.Tensor) -> dict:
        """``validation_f1`` and :data:`SCANVI_METRICS` of (n, n_labels) logits and labels."""
        from torchmetrics.functional import classification as tmf

        n_labels, pred = self.module.n_labels, logits.argmax(-1)
        return {
            "validation_f1": tmf.multiclass_f1_score(pred, true, n_labels, average="macro").item(),
            "validation_classification_loss": torch.nn.functional.cross_entropy(
                logits, true
            ).item(),
            "validation_accuracy": tmf.multiclass_accuracy(
                pred, true, n_labels, average="micro"
            ).item(),
            "validation_f1_score": tmf.multiclass_f1_score(
                pred, true, n_labels, average="micro"
            ).item(),
            "validation_calibration_error": tmf.multiclass_calibration_error(
                logits, true, n_labels
            ).item(),
        }

    def on_train_end(self):
        """Load the best validation epoch's state (``keep_best_state``)."""
        if self.best_state is not None:
            self.module.load_state_dict(self.best_state)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Lightning checkpoints (resume after a crash): besides the weights, buffers (the VAE
        latent's KL warm-up counter ``kl_step_count``), optimiser, schedulers and loops that
        Lightning saves, keep what it does not know: the official plateau scheduler, the best
        validation state, and the random number generators (so that a resumed run draws the
        masks and dropout of the uninterrupted one)."""
        state = {
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": _numpy_rng_state(),
                "python": random.getstate(),
            },
            "best": (self.best_state, self.best_epoch, self.best_score),
            "epoch_losses": list(self._epoch_losses),
        }
        if getattr(self, "official_plateau", None) is not None:
            state["official_plateau"] = self.official_plateau.state_dict()
        checkpoint[CHECKPOINT_KEY] = state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore what :meth:`on_save_checkpoint` added; the plateau scheduler and the random
        generators in :meth:`on_train_start` (once the optimiser exists, and after Lightning
        has set up the loaders, so nothing draws between the restore and the first step)."""
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            return
        self.best_state, self.best_epoch, self.best_score = state["best"]
        self._epoch_losses = list(state["epoch_losses"])
        self._resume_state = state

    def on_train_start(self):
        """A resumed run: load the official plateau scheduler and the random generators."""
        state, self._resume_state = getattr(self, "_resume_state", None), None
        if state is None:
            return
        if state.get("official_plateau") and getattr(self, "official_plateau", None) is not None:
            self.official_plateau.load_state_dict(state["official_plateau"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            if len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
        _set_numpy_rng_state(rng["numpy"])
        random.setstate(rng["python"])

    def on_train_batch_start(self, batch, batch_idx):
        """Linear warm-up by hand when a plateau scheduler owns the learning rate."""
        if not self.reduce_lr_on_plateau or self.global_step > self.n_steps_lr_warmup:
            return
        for group in self.trainer.optimizers[0].param_groups:
            group.setdefault("warmup_target_lr", group["lr"])
            factor = min(1.0, (self.global_step + 1) / max(1, self.n_steps_lr_warmup))
            group["lr"] = group["warmup_target_lr"] * factor

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip gradients, also for a fused optimizer under mixed precision.

        scvi-tools >= 1.5 builds AdamW fused wherever torch allows it (CPU and CUDA). A fused
        optimizer unscales fp16 gradients inside its step, so Lightning refuses to clip for it
        under mixed precision. Clipping is still well defined: with bf16 there is no loss
        scale, the gradients are the true ones; with fp16 the grad scaler unscales them here
        first, and its step then passes the fused kernel no scale (it only skips the step on
        inf/NaN, as usual). Every other case is Lightning's own.
        """
        precision = self.trainer.precision_plugin
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        if not (gradient_clip_val and fused and isinstance(precision, MixedPrecision)):
            super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
            return
        if precision.scaler is not None:  # fp16: true gradients before clipping
            precision.scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        algorithm = gradient_clip_algorithm or self.trainer.gradient_clip_algorithm or "norm"
        if str(getattr(algorithm, "value", algorithm)).lower() == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def compute_and_log_metrics(self, loss_output, metrics, mode):
        """Log scvi's metrics; under DDP the extra 0-d metrics (latent and classification loss)
        are left out, because Lightning cannot reduce them across processes (it fails on an
        in-place update of an inference tensor)."""
        if self.use_sync_dist and loss_output.extra_metrics:
            loss_output = dataclasses.replace(loss_output, extra_metrics={})
        return super().compute_and_log_metrics(loss_output, metrics, mode)
