"""Training plan: scvi's TrainingPlan with AdamW and a linear warm-up of the learning rate."""

from __future__ import annotations

from scvi.train import TrainingPlan
from torch.optim.lr_scheduler import LambdaLR


class CellPLMTrainingPlan(TrainingPlan):
    """:class:`~scvi.train.TrainingPlan` with AdamW and ``n_steps_lr_warmup`` warm-up steps.

    Transformers train badly at full learning rate from step one; the official fine-tuning
    recipes warm up linearly. The KL term is not annealed by default (the official latent
    losses use free-bits floors instead).
    """

    def __init__(
        self,
        module,
        *,
        lr: float = 5e-4,
        weight_decay: float = 1e-6,
        n_steps_lr_warmup: int = 50,
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

    def configure_optimizers(self):
        """AdamW (from the parent) plus a per-step linear warm-up."""
        config = super().configure_optimizers()
        if self.n_steps_lr_warmup and "lr_scheduler" not in config:
            warmup = max(1, self.n_steps_lr_warmup)
            scheduler = LambdaLR(config["optimizer"], lambda step: min(1.0, (step + 1) / warmup))
            config["lr_scheduler"] = {"scheduler": scheduler, "interval": "step"}
        return config
