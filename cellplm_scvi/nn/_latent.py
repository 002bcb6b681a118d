"""Latent layers: Gaussian-mixture VAE (``gmvae``) and plain VAE (``vae``).

Both map the pre-latent state ``h`` (N, d) to a latent ``z`` (N, n_latent) and a scalar latent
loss. The official layers sit at ``latent.layers.1`` (``layers.0`` is a parameter-free
placeholder); :class:`LatentStack` keeps those state-dict names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _log_normal(x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """log N(x; mu, var + 1e-8), summed over the last dimension."""
    var = var + 1e-8
    return -0.5 * (math.log(2 * math.pi) + var.log() + (x - mu).pow(2) / var).sum(-1)


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

    Training draws a soft Gumbel-softmax cluster ``y`` (temperature 1) and ``z ~ q(z|h,y)``.
    Evaluation is deterministic: ``y = one_hot(argmax q(y|h))`` and ``z = E[z|h,y]`` (the
    official code samples a hard Gumbel ``y`` at evaluation, so its embeddings are random).

    The loss is ``w_li * max(lamda, KL_gauss) + w_en * max(lamda, KL(q(y|h) || uniform))``, with
    one-sample KL estimates averaged over cells (official "free-bits" floors).
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

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``z``, ``qz_m``, ``qz_v``, ``y_probs``, per-cell ``kl`` and scalar ``loss``."""
        logits = self.cluster_logits(h)
        probs = logits.softmax(-1)
        if self.training:
            gumbel = -torch.log(-torch.log(torch.rand_like(logits) + 1e-20) + 1e-20)
            y = (logits + gumbel).softmax(-1)
        else:
            y = F.one_hot(logits.argmax(-1), self.n_clusters).to(h.dtype)
        qz_m, qz_v = self.posterior(h, y)
        if not self.training:
            return {"z": qz_m, "qz_m": qz_m, "qz_v": qz_v, "y_probs": probs}
        z = qz_m + torch.randn_like(qz_m) * (qz_v + 1e-10).sqrt()
        pz_m, pz_v = self.prior(y)
        kl_gauss = _log_normal(z, qz_m, qz_v) - _log_normal(z, pz_m, pz_v)  # (N,)
        kl_cat = (probs * F.log_softmax(logits, -1)).sum(-1) + math.log(self.n_clusters)  # (N,)
        loss = self.w_li * kl_gauss.mean().clamp(min=self.lamda)
        loss = loss + self.w_en * kl_cat.mean().clamp(min=self.lamda)
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
    ``var_eps``). The KL to N(0, I), averaged over cells, counts only once it exceeds ``lamda``.
    """

    def __init__(self, n_in: int, n_latent: int, lamda: float = 1.0):
        super().__init__()
        self.hid_2mu = nn.Linear(n_in, n_latent)
        self.hid_2sigma = nn.Linear(n_in, n_latent)
        self.lamda = lamda

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``z``, ``qz_m``, ``qz_v`` and, in training, per-cell ``kl`` and ``loss``."""
        mu = self.hid_2mu(h)
        var = self.hid_2sigma(h).clamp(-5, 5).exp() + 1e-4
        if not self.training:
            return {"z": mu, "qz_m": mu, "qz_v": var}
        z = mu + var.sqrt() * torch.randn_like(mu)
        kl = -0.5 * (1 + var.log() - mu.pow(2) - var).sum(-1)  # (N,)
        loss = kl.mean()
        loss = torch.where(loss < self.lamda, torch.zeros_like(loss), loss)
        return {"z": z, "qz_m": mu, "qz_v": var, "kl": kl, "loss": loss}


class LatentStack(nn.Module):
    """Holds the latent layer at index 1, as in the official ``LatentModel``."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList([nn.Identity(), layer])

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, d) -> dict of latent outputs (see the layer)."""
        return self.layers[1](h)
