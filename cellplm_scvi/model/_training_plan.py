"""Training plan: scvi's TrainingPlan with AdamW, a learning-rate warm-up and an optional
smaller learning rate for the gene embedder (official fine-tuning recipe)."""

from __future__ import annotations

import dataclasses

import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from scvi.train import TrainingPlan
from torch.optim.lr_scheduler import LambdaLR


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
    embedder_lr_factor
        Learning rate of the embedder relative to ``lr`` (official fine-tuning: 0.1).
    n_epochs_kl_warmup
        KL annealing (off by default: the official latent losses use free-bits floors).
    **kwargs
        Passed to :class:`~scvi.train.TrainingPlan`, e.g. ``reduce_lr_on_plateau=True`` with
        ``lr_factor``, ``lr_patience``, ``lr_threshold``, ``lr_min`` and
        ``lr_scheduler_metric`` (scvi-tools' plateau scheduler, stepped after each validation
        epoch; the warm-up then runs before it, and the plateau scheduler owns the rate after).
    """

    def __init__(
        self,
        module,
        *,
        lr: float = 5e-4,
        weight_decay: float = 1e-6,
        n_steps_lr_warmup: int = 50,
        embedder_lr_factor: float = 1.0,
        n_epochs_kl_warmup: int | None = None,
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
        self.n_steps_lr_warmup = n_steps_lr_warmup
        self.embedder_lr_factor = embedder_lr_factor

    def configure_optimizers(self):
        """AdamW over trainable parameters (embedder at ``lr * embedder_lr_factor``) and a
        per-step linear warm-up."""
        embedder_ids = {id(p) for p in self.module.embedder.parameters()}
        rest, embedder, no_decay = [], [], []
        for p in self.module.parameters():
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
            groups.append({"params": embedder, "lr": self.lr * self.embedder_lr_factor})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        optimizer = self.get_optimizer_creator()(groups)
        config = {"optimizer": optimizer}
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
        elif self.n_steps_lr_warmup:
            warmup = max(1, self.n_steps_lr_warmup)
            scheduler = LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
            config["lr_scheduler"] = {"scheduler": scheduler, "interval": "step"}
        return config

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
