"""Latent layers: Gaussian-mixture VAE (``gmvae``) and plain VAE (``vae``).

Both map the pre-latent state ``h`` (N, d) to a latent ``z`` (N, n_latent) and return, in
training *and* evaluation, the scalar latent ``loss`` that the module adds to the reconstruction
loss (times scvi-tools' ``kl_weight``, 1 unless ``n_epochs_kl_warmup`` is set). The official
layers sit at ``latent.layers.1`` (``layers.0`` is a parameter-free placeholder);
:class:`LatentStack` keeps those state-dict names.

Free-bits floors (``lamda``) follow the official code exactly: a term below its floor is the
*constant* floor, so the parameters that only that term reaches get no gradient at all
(``grad is None``; AdamW then leaves them alone, neither moving nor decaying them). Under
``torch.distributed`` (DDP) the floored term stays connected with a zero gradient instead,
because DDP without ``find_unused_parameters`` requires every parameter to take part in every
backward pass; :meth:`GMVAELatent.drop_floored_gradients`, called after the gradient
all-reduce, then turns the exactly-zero gradients back into ``None``.

A packed minibatch (several tissues per step, ``tissues=`` a
:class:`~cellplm_scvi.nn.TissueSegments`) gets the mean over its tissues of each tissue's loss,
every tissue with its own floors: the loss and gradients of the tissues run one by one and
averaged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._segments import TissueSegments


def _log_normal(x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """log N(x; mu, var + 1e-8), summed over the last dimension."""
    var = var + 1e-8
    return -0.5 * (math.log(2 * math.pi) + var.log() + (x - mu).pow(2) / var).sum(-1)


def _expected_gaussian_kl(
    qz_m: torch.Tensor, qz_v: torch.Tensor, pz_m: torch.Tensor, pz_v: torch.Tensor
) -> torch.Tensor:
    """E over ``z = qz_m + sqrt(qz_v + 1e-10) eps`` of ``log N(z; q) - log N(z; p)``, (N,).

    The expectation of the official one-sample estimate (both densities with ``var + 1e-8``),
    in closed form: a deterministic evaluation loss.
    """
    q_var, p_var, z_var = qz_v + 1e-8, pz_v + 1e-8, qz_v + 1e-10
    per_dim = p_var.log() - q_var.log() + (z_var + (qz_m - pz_m).pow(2)) / p_var - z_var / q_var
    return 0.5 * per_dim.sum(-1)


def _keep_floored_terms_connected() -> bool:
    """Whether a floored loss term must keep (zero) gradients: under torch.distributed."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _free_bits(value: torch.Tensor, floor: float) -> torch.Tensor:
    """Official ``max(floor, value)``: ``value`` if it exceeds ``floor``, else the constant.

    The constant has no autograd graph, so the parameters reached only through ``value`` get no
    gradient (as the official Python float). Under torch.distributed it is ``floor + 0 * value``
    (same loss, zero gradients) so that every parameter takes part in the backward pass.

    ``value`` may hold one term per tissue (packed step, (T,)): each is floored on its own, and
    only when all are floored does the result lose its graph.
    """
    if value.dim():  # (T,): the floored tissues add the constant and no gradient
        above = value > floor
        if bool(above.any()):  # one host sync per term
            return torch.where(above, value, torch.full_like(value, floor).detach())
    elif bool(value > floor):  # one host sync per term, as the official Python comparison
        return value
    if torch.is_grad_enabled() and value.requires_grad and _keep_floored_terms_connected():
        return value * 0.0 + floor
    return torch.full_like(value, floor).detach()


class _Logits(nn.Module):
    def __init__(self, n_in: int, n_clusters: int):
        super().__init__()
        self.logits = nn.Linear(n_in, n_clusters)


class _Gaussian(nn.Module):
    def __init__(self, n_in: int, n_latent: int):
        super().__init__()
        self.mu = nn.Linear(n_in, n_latent)
        self.var = nn.Linear(n_in, n_latent)  # softplus -> variance


class _GMVAENets(nn.Module):
    """q(y|h), q(z|h,y) and p(z|y); nesting mirrors the official ``InferenceNet`` keys."""

    def __init__(self, n_in: int, n_latent: int, n_clusters: int, n_qz_hidden: int = 512):
        super().__init__()
        self.inference_qyx = nn.ModuleList([_Logits(n_in, n_clusters)])
        self.inference_qzyx = nn.ModuleList(
            [
                nn.Linear(n_in + n_clusters, n_qz_hidden),
                nn.ReLU(),
                _Gaussian(n_qz_hidden, n_latent),
            ]
        )
        self.y_mu = nn.Linear(n_clusters, n_latent)
        self.y_var = nn.Linear(n_clusters, n_latent)


class GMVAELatent(nn.Module):
    """Gaussian-mixture latent with ``n_clusters`` components.

    Training draws a soft Gumbel-softmax cluster ``y`` (temperature 1) and ``z ~ q(z|h,y)``, in
    the official order of random draws (uniform for the Gumbel noise, then normal for ``z``).
    Evaluation is deterministic: ``y = one_hot(argmax q(y|h))`` and ``z = E[z|h,y]`` (the
    official code samples a hard Gumbel ``y`` at evaluation, so its embeddings are random).

    The loss is ``w_li * max(lamda, KL_gauss) + w_en * max(lamda, KL(q(y|h) || uniform))``, KL
    estimates averaged over cells (official "free-bits" floors, see the module docstring: a
    floored ``KL_gauss`` leaves the prior nets ``y_mu``/``y_var`` without gradient). Training
    uses the official one-sample ``KL_gauss``; evaluation, like the official code, also returns
    the loss (so that validation losses include it), with ``KL_gauss`` in closed form given the
    deterministic ``y`` instead of a random sample.
    """

    def __init__(
        self,
        n_in: int,
        n_latent: int,
        n_clusters: int = 16,
        lamda: float = 5.0,
        w_li: float = 5.0,
        w_en: float = 5.0,
    ):
        super().__init__()
        self.inference = _GMVAENets(n_in, n_latent, n_clusters)
        self.n_clusters = n_clusters
        self.lamda, self.w_li, self.w_en = lamda, w_li, w_en

    def cluster_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N, K) logits of q(y|h)."""
        return self.inference.inference_qyx[0].logits(h)

    def posterior(self, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(z|h,y), each (N, n_latent)."""
        linear, relu, gaussian = self.inference.inference_qzyx
        u = relu(linear(torch.cat([h, y], dim=1)))
        return gaussian.mu(u), F.softplus(gaussian.var(u))

    def prior(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of p(z|y)."""
        return self.inference.y_mu(y), F.softplus(self.inference.y_var(y))

    def prior_parameters(self) -> list[nn.Parameter]:
        """The parameters of p(z|y), reached by the loss only through ``KL_gauss``."""
        return [*self.inference.y_mu.parameters(), *self.inference.y_var.parameters()]

    @torch.no_grad()
    def drop_floored_gradients(self) -> None:
        """Set the prior nets' gradients to ``None`` where they are exactly zero.

        Call after the backward pass (after DDP's all-reduce) and before the optimizer step. A
        zero gradient there means ``KL_gauss`` was floored on every process, so, as in the
        official single-process code, AdamW must skip these parameters. The gradients are the
        same on every process after the all-reduce, so all processes decide alike. Without
        torch.distributed the floored gradients are already ``None`` and this does nothing.
        """
        params = [p for p in self.prior_parameters() if p.grad is not None]
        if not params:
            return
        if not torch.stack([p.grad.abs().max() for p in params]).any():
            for p in params:
                p.grad = None

    def forward(
        self, h: torch.Tensor, tissues: TissueSegments | None = None
    ) -> dict[str, torch.Tensor]:
        """Return ``z``, ``qz_m``, ``qz_v``, ``y_probs``, per-cell ``kl`` and scalar ``loss``
        (with packed ``tissues``: the mean of the per-tissue losses)."""
        logits = self.cluster_logits(h)
        probs = logits.softmax(-1)
        if self.training:
            gumbel = -torch.log(-torch.log(torch.rand_like(logits) + 1e-20) + 1e-20)
            y = (logits + gumbel).softmax(-1)
        else:
            y = F.one_hot(logits.argmax(-1), self.n_clusters).to(h.dtype)
        qz_m, qz_v = self.posterior(h, y)
        pz_m, pz_v = self.prior(y)
        if self.training:
            z = qz_m + torch.randn_like(qz_m) * (qz_v + 1e-10).sqrt()
            kl_gauss = _log_normal(z, qz_m, qz_v) - _log_normal(z, pz_m, pz_v)  # (N,)
        else:
            z = qz_m
            kl_gauss = _expected_gaussian_kl(qz_m, qz_v, pz_m, pz_v)  # (N,)
        kl_cat = (probs * F.log_softmax(logits, -1)).sum(-1) + math.log(self.n_clusters)  # (N,)
        if tissues is None:
            loss = self.w_li * _free_bits(kl_gauss.mean(), self.lamda)
            loss = loss + self.w_en * _free_bits(kl_cat.mean(), self.lamda)
        else:  # per-tissue means, floors and losses (T,), then their mean
            loss = self.w_li * _free_bits(tissues.mean(kl_gauss), self.lamda)
            loss = (loss + self.w_en * _free_bits(tissues.mean(kl_cat), self.lamda)).mean()
        return {
            "z": z,
            "qz_m": qz_m,
            "qz_v": qz_v,
            "y_probs": probs,
            "kl": kl_gauss + kl_cat,
            "loss": loss,
        }


class VAELatent(nn.Module):
    """Diagonal-Gaussian latent: ``z = mu + sigma * eps`` in training, ``mu`` in evaluation.

    ``log sigma^2`` is clamped to [-5, 5] and ``1e-4`` is added to the variance (official
    ``var_eps``). The loss is, as in the official code, the cell-averaged KL to N(0, I) times a
    warm-up weight, counted only once that *weighted* KL exceeds ``lamda``; in evaluation it
    is 0.

    The official warm-up weight of the ``t``-th training forward pass (``t = 0, 1, ...``) is
    ``max_kl_weight * min(t, kl_warmup_steps - 1) / kl_warmup_steps``: 0 at the first step,
    then ``+1e-4`` per step, and 0.9999 from step 9,999 on (the official counter stops one
    short of 1). ``t`` is the buffer ``kl_step_count``, saved with the model (a resumed run
    continues it); an official checkpoint holds none, so a loaded official model starts at 0,
    as the official fine-tuning does. This weight multiplies with scvi-tools' ``kl_weight``
    (``n_epochs_kl_warmup``, off by default); ``kl_warmup_steps=0`` turns the official
    warm-up off.

    Parameters
    ----------
    n_in, n_latent
        Input and latent widths.
    lamda
        Free-bits floor of the weighted KL (official default 1.0).
    kl_warmup_steps
        Training steps of the official linear KL warm-up (official: 10,000; 0: none).
    max_kl_weight
        Weight the warm-up ramps towards (official: 1.0).
    """

    training_state = ("kl_step_count",)  # buffers an official checkpoint cannot hold

    def __init__(
        self,
        n_in: int,
        n_latent: int,
        lamda: float = 1.0,
        kl_warmup_steps: int = 10_000,
        max_kl_weight: float = 1.0,
    ):
        super().__init__()
        if kl_warmup_steps < 0 or kl_warmup_steps == 1:
            raise ValueError(
                f"kl_warmup_steps must be 0 (no warm-up) or at least 2, got {kl_warmup_steps} "
                "(the official schedule with 1 step would keep the KL weight at 0 forever)."
            )
        self.hid_2mu = nn.Linear(n_in, n_latent)
        self.hid_2sigma = nn.Linear(n_in, n_latent)
        self.lamda = lamda
        self.kl_warmup_steps, self.max_kl_weight = kl_warmup_steps, max_kl_weight
        self.register_buffer("kl_step_count", torch.zeros((), dtype=torch.long))

    def kl_weight(self) -> torch.Tensor:
        """Official warm-up weight of the current training step, a 0-d float tensor (computed
        on the device: no host sync)."""
        if self.kl_warmup_steps == 0:
            return torch.full((), self.max_kl_weight, device=self.kl_step_count.device)
        step = self.kl_step_count.clamp(max=self.kl_warmup_steps - 1).float()
        return step * (self.max_kl_weight / self.kl_warmup_steps)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, *args):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, *args)
        for name in self.training_state:  # absent from official checkpoints: keep the count
            if prefix + name in missing:
                missing.remove(prefix + name)

    def forward(
        self, h: torch.Tensor, tissues: TissueSegments | None = None
    ) -> dict[str, torch.Tensor]:
        """Return ``z``, ``qz_m``, ``qz_v``, per-cell ``kl`` and the scalar ``loss`` (with packed
        ``tissues``: the mean of the per-tissue losses, one warm-up step for the whole pass)."""
        mu = self.hid_2mu(h)
        var = self.hid_2sigma(h).clamp(-5, 5).exp() + 1e-4
        kl = -0.5 * (1 + var.log() - mu.pow(2) - var).sum(-1)  # (N,)
        if not self.training:
            return {"z": mu, "qz_m": mu, "qz_v": var, "kl": kl, "loss": kl.new_zeros(())}
        z = mu + var.sqrt() * torch.randn_like(mu)
        kl_mean = kl.mean() if tissues is None else tissues.mean(kl)  # () or (T,)
        weighted = kl_mean * self.kl_weight().to(kl.dtype)
        # below the floor the term is 0; its parameters also feed z, so a zero gradient here
        # is the official "no gradient" and needs no host sync
        loss = torch.where(weighted < self.lamda, torch.zeros_like(weighted), weighted)
        if tissues is not None:
            loss = loss.mean()
        self.kl_step_count += 1  # once per training forward pass (one optimizer step)
        return {"z": z, "qz_m": mu, "qz_v": var, "kl": kl, "loss": loss}


class LatentStack(nn.Module):
    """Holds the latent layer at index 1, as in the official ``LatentModel``."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList([nn.Identity(), layer])

    def forward(
        self, h: torch.Tensor, tissues: TissueSegments | None = None
    ) -> dict[str, torch.Tensor]:
        """(N, d) -> dict of latent outputs (see the layer); ``tissues``: a packed step."""
        return self.layers[1](h) if tissues is None else self.layers[1](h, tissues)
