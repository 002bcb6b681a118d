"""Gradient clipping under mixed precision with a fused AdamW.

scvi-tools >= 1.5 builds its optimizer fused wherever torch allows it, and Lightning refuses to
clip the gradients of a fused optimizer under mixed precision. The optimizer is forced fused
here, so every stack (also scvi-tools 1.4, which never fuses) runs this path.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import scvi
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision

import cellplm_scvi as cp
from cellplm_scvi import CellPLM
from tests._helpers import ARCH, FIT

CLIP = 1e-3  # far below the gradient norm of an untrained model: every step is clipped


def _fused_adamw(params) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=1e-4, fused=True)


class _StepRecorder(Callback):
    """Per optimizer step: the norm of the gradients it steps with, and the loss scale it is
    told to undo (``None``: the gradients are already the true ones)."""

    def __init__(self):
        self.steps: list[tuple[float, object]] = []
        self.fused: list[bool] = []

    def on_train_start(self, trainer, pl_module):
        for optimizer in trainer.optimizers:
            self.fused.append(getattr(optimizer, "_step_supports_amp_scaling", False))
            # after the step: Lightning runs the closure (backward) inside optimizer.step
            optimizer.register_step_post_hook(self._record)

    def _record(self, optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        self.steps.append((norm.item(), getattr(optimizer, "grad_scale", None)))


class _LossScalingOnly(MixedPrecision):
    """fp16 mixed precision's loss scaling (GradScaler), with the network left in float32.

    The scaling is what gradient clipping has to deal with; the fp16 network itself overflows
    in the decoder on CPU (its mean clamp at 1e6 exceeds the fp16 range).
    """

    def __init__(self):
        super().__init__("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))

    def forward_context(self):
        return contextlib.nullcontext()


PRECISIONS = [
    pytest.param(lambda: {"precision": "bf16-mixed"}, id="bf16-mixed"),
    pytest.param(lambda: {"plugins": [_LossScalingOnly()]}, id="16-mixed-loss-scaling"),
]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_fused_optimizer_is_clipped_under_mixed_precision(precision):
    adata = cp.datasets.simulate_tissue(n_cells=300, n_slides=1, seed=0)
    CellPLM.setup_anndata(adata, layer="counts")
    scvi.settings.seed = 0
    model = CellPLM(adata, **ARCH)
    recorder = _StepRecorder()
    model.train(
        max_epochs=2,
        max_cells_per_step=100,
        gradient_clip_val=CLIP,
        plan_kwargs={"optimizer": "Custom", "optimizer_creator": _fused_adamw},
        callbacks=[recorder],
        **precision(),
        **FIT,
    )
    assert recorder.fused == [True]
    assert len(recorder.steps) >= 2
    for norm, loss_scale in recorder.steps:
        assert loss_scale is None  # unscaled before clipping: the fused step must not rescale
        assert CLIP * 0.99 < norm < CLIP * 1.01  # clipped to CLIP, in true-gradient units
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()
