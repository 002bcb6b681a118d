"""Training plan: scvi's TrainingPlan with AdamW, a learning-rate warm-up and an optional
smaller learning rate for the gene embedder (official fine-tuning recipe)."""

from __future__ import annotations

import dataclasses

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
        Passed to :class:`~scvi.train.TrainingPlan`.
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
        if self.n_steps_lr_warmup:
            warmup = max(1, self.n_steps_lr_warmup)
            scheduler = LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
            config["lr_scheduler"] = {"scheduler": scheduler, "interval": "step"}
        return config

    def compute_and_log_metrics(self, loss_output, metrics, mode):
        """Log scvi's metrics; under DDP the extra 0-d metrics (latent and classification loss)
        are left out, because Lightning cannot reduce them across processes (it fails on an
        in-place update of an inference tensor)."""
        if self.use_sync_dist and loss_output.extra_metrics:
            loss_output = dataclasses.replace(loss_output, extra_metrics={})
        return super().compute_and_log_metrics(loss_output, metrics, mode)
