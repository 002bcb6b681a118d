"""Local heads: flow attention through a distance-decaying spatial kernel (issue 14).

The kernel features (:func:`cellplm_scvi.nn.spatial_kernel_features`), the local heads of
:class:`~cellplm_scvi.nn.FlowAttention` (one tissue, packed tissues, cells without
coordinates) and a model built with ``n_local_heads`` (train, save/load, int8).
"""

from __future__ import annotations

import numpy as np
import pytest
import scvi
import torch

import cellplm_scvi as cp
from cellplm_scvi import CellPLM
from cellplm_scvi.nn import FlowAttention, TissueSegments, spatial_kernel_features
from tests._helpers import ARCH


def test_kernel_decays_with_distance_like_a_gaussian():
    """psi_i . psi_j = exp(-d^2 / (2 s^2)) times a factor nearly constant inside the lattice."""
    grid = 5
    step = 1.0 / (grid - 1)
    centre = torch.tensor([[0.5, 0.5]])
    dist = torch.linspace(0.0, 0.4, 9)
    others = torch.stack([0.5 + dist, torch.full_like(dist, 0.5)], 1)
    corners = torch.tensor([[0.0, 0.0], [1.0, 1.0]])  # fix the tissue's extent to [0, 1]^2
    psi = spatial_kernel_features(torch.cat([centre, others, corners]), grid)
    assert psi.shape == (12, grid**2) and bool((psi > 0).all())
    kernel = (psi[0] @ psi[1:10].T).numpy()  # (9,)
    assert np.all(np.diff(kernel) < 0)  # strictly decaying with distance
    gaussian = np.exp(-(dist.numpy() ** 2) / (2 * step**2))
    ratio = kernel / gaussian
    assert ratio.max() / ratio.min() < 1.05  # the midpoint factor barely moves inside


def test_kernel_scales_each_tissue_isotropically_and_handles_missing_coordinates():
    xy = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 1.0], [float("nan"), 3.0]])
    psi = spatial_kernel_features(xy, 4)
    shifted = spatial_kernel_features(xy * 7.0 + 100.0, 4)
    torch.testing.assert_close(psi, shifted)  # translation and scale invariant
    torch.testing.assert_close(psi[3], torch.full((16,), 0.25))  # NaN: uniform 1 / sqrt(M)
    # isotropic: a step of 1 along y (the short side) is a small distance, not a full side
    assert psi[0] @ psi[2] > psi[0] @ psi[1]
    with pytest.raises(ValueError, match="grid"):
        spatial_kernel_features(xy, 1)


def test_local_heads_read_their_neighbourhood():
    """Perturbing a far cell moves a cell's output less than perturbing a near cell, with
    local heads; with global heads both move it alike (up to the flows)."""
    torch.manual_seed(0)
    n = 200
    coords = torch.rand(n, 2)
    x = torch.randn(n, 16)
    psi = spatial_kernel_features(coords, 6)
    d = (coords - coords[0]).norm(dim=1)
    near, far = int(d[1:].argmin()) + 1, int(d.argmax())

    def shift(att: FlowAttention, j: int) -> float:
        with torch.no_grad():
            base = att(x, None, psi)[0]
            moved = x.clone()
            moved[j] += 5.0
            return float((att(moved, None, psi)[0] - base).norm())

    local = FlowAttention(16, 2, dropout=0.0, n_local_heads=2).eval()
    assert shift(local, near) > 20 * shift(local, far)
    plain = FlowAttention(16, 2, dropout=0.0).eval()
    plain.load_state_dict(local.state_dict())
    assert shift(plain, near) < 3 * shift(plain, far)


def test_local_heads_packed_equal_one_by_one_and_zero_heads_is_the_official_attention():
    torch.manual_seed(0)
    att = FlowAttention(32, 4, dropout=0.0, n_local_heads=2).eval()
    x, coords = torch.randn(45, 32), torch.rand(45, 2) * 50
    index = torch.tensor([1] * 15 + [0] * 30)[torch.randperm(45)]
    tissues = TissueSegments.from_index(index)
    packed = att(x, tissues, spatial_kernel_features(coords, 4, tissues))
    for t in range(2):
        rows = index == t
        alone = att(x[rows], None, spatial_kernel_features(coords[rows], 4))
        torch.testing.assert_close(packed[rows], alone, atol=1e-6, rtol=1e-5)
    official = FlowAttention(32, 4, dropout=0.0).eval()
    official.load_state_dict(att.state_dict())  # same parameters: the kernel adds none
    torch.testing.assert_close(official(x), att(x))  # no coordinates: every head global
    assert not torch.allclose(official(x), att(x, None, spatial_kernel_features(coords, 4)))
    with pytest.raises(ValueError, match="n_local_heads"):
        FlowAttention(32, 4, n_local_heads=5)


@pytest.mark.slow
def test_model_with_local_heads_trains_saves_and_loads(tmp_path):
    scvi.settings.seed = 0
    adata = cp.datasets.simulate_tissue(n_cells=400, n_slides=2, seed=0)
    CellPLM.setup_anndata(
        adata, layer="counts", spatial_key="spatial", library_key="slide", max_cells=100
    )
    model = CellPLM(adata, n_local_heads=2, **ARCH)
    assert model.module.encoder.layers[0].self_attn.n_local_heads == 2
    model.train(max_epochs=1, accelerator="cpu", enable_progress_bar=False, train_size=1.0)
    z = model.get_latent_representation()
    model.module.n_local_heads = 0  # read the same weights without the kernel
    for layer in model.module.encoder.layers:
        layer.self_attn.n_local_heads = 0
    assert not np.allclose(z, model.get_latent_representation(), atol=1e-4)
    model.module.n_local_heads = 2
    for layer in model.module.encoder.layers:
        layer.self_attn.n_local_heads = 2
    np.testing.assert_allclose(model.get_latent_representation(), z, atol=1e-6)
    model.save(tmp_path / "m")
    loaded = CellPLM.load(tmp_path / "m", adata=adata)
    assert loaded.module.n_local_heads == 2
    np.testing.assert_allclose(loaded.get_latent_representation(), z, atol=1e-6)
    # a file written before the local heads (no n_local_heads saved) loads without them
    payload = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    params = payload["attr_dict"]["init_params_"]
    del params["kwargs"]["module_kwargs"]["n_local_heads"]
    params["non_kwargs"].pop("preset", None)  # such a file also predates the presets
    torch.save(payload, tmp_path / "m" / "model.pt")
    old = CellPLM.load(tmp_path / "m", adata=adata)
    assert (
        old.module.n_local_heads == 0 and old.module.encoder.layers[0].self_attn.n_local_heads == 0
    )
    assert not np.allclose(old.get_latent_representation(), z, atol=1e-4)
    int8 = loaded.get_latent_representation(precision="int8")
    cosine = (int8 * z).sum(1) / np.linalg.norm(int8, axis=1) / np.linalg.norm(z, axis=1)
    assert cosine.min() > 0.99
