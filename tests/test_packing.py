"""Several tissues per step ("packed sentences", ``pack_tissues=True``).

A packed step of T tissues must compute, for every tissue, exactly what a step of that tissue
alone computes: per-cell outputs, and a loss equal to the mean of the per-tissue losses (each
with its own free-bits floors), hence the same gradients. The two runs get the same random
numbers where the model draws them:

- masks: ``sample_mask`` is replaced by one fixed mask per tissue (the packed step draws one mask
  per tissue, the one-by-one run one per step);
- latent noise (Gumbel uniforms, reparameterisation normals): :class:`RowNoise` hands out fixed
  noise rows in row order, so cell ``i`` gets the same noise in both runs;
- dropout is set to 0 (the flow attention's hard-coded 0.01 included).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import scvi
import torch
from torch import nn

import cellplm_scvi as cp
import cellplm_scvi.module._cellplm as module_impl
from cellplm_scvi._constants import LABELS_KEY, LOSS_MASK_KEY, SPATIAL_KEY, TISSUE_INDEX_KEY, X_KEY
from cellplm_scvi._genes import official_config
from cellplm_scvi.data import TissueBatchSampler
from cellplm_scvi.data._tissue_loader import _to_csr_tensor, pack_minibatches, pack_steps
from cellplm_scvi.module import CellPLMModule
from cellplm_scvi.module._masking import TissueMask
from cellplm_scvi.nn import FlowformerEncoder, TissueSegments

SIZES = (5, 9, 14)  # three tissues of different sizes
N_GENES = 40
TOL = 1e-5


# ------------------------------------------------------------------------------ helpers


class RowNoise:
    """Fixed noise for ``torch.rand_like`` / ``torch.randn_like``, handed out row by row.

    Each (kind, width) has one table of rows; calls take the next rows in turn, so a packed
    call on rows 0..N-1 and the tissues' calls on their row ranges, one after the other, get the
    same noise per row. :meth:`rewind` starts over.
    """

    def __init__(self, n_rows: int):
        self.n_rows, self.tables, self.cursor = n_rows, {}, {}

    def rewind(self) -> None:
        self.cursor.clear()

    def _draw(self, kind: str, like: torch.Tensor) -> torch.Tensor:
        key = (kind, like.shape[-1])
        if key not in self.tables:
            gen = torch.Generator().manual_seed(len(self.tables) + 1)
            draw = torch.rand if kind == "uniform" else torch.randn
            self.tables[key] = draw(self.n_rows, like.shape[-1], generator=gen)
        start = self.cursor.get(key, 0)
        self.cursor[key] = start + like.shape[0]
        return self.tables[key][start : start + like.shape[0]].to(like)

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(torch, "rand_like", lambda t, **kw: self._draw("uniform", t))
        monkeypatch.setattr(torch, "randn_like", lambda t, **kw: self._draw("normal", t))


def _tissues(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Three tissue minibatches as :class:`TissueDataset` yields them: counts (CSR), labels
    (one tissue unlabelled) and coordinates on different scales per tissue."""
    rng = np.random.default_rng(seed)
    out = []
    for t, n in enumerate(SIZES):
        counts = rng.poisson(rng.gamma(0.6, 3.0, (n, N_GENES))).astype(np.float32)
        labels = rng.integers(0, 3, (n, 1)) if t != 1 else np.full((n, 1), 3)  # 3 = unlabelled
        coords = rng.uniform(0, 10 ** (t + 1), (n, 2)).astype(np.float32)
        out.append(
            {
                X_KEY: _to_csr_tensor(sp.csr_matrix(counts)),
                LABELS_KEY: torch.as_tensor(labels),
                SPATIAL_KEY: torch.as_tensor(coords),
            }
        )
    return out


class FixedMasks(dict):
    """A fixed mask per tissue size (the sizes of a test's tissues differ, or share the mask),
    drawn by the official rule; stands in for ``sample_mask``."""

    def __missing__(self, n: int) -> TissueMask:
        gen = torch.Generator().manual_seed(n)
        cells = torch.randperm(n, generator=gen)[: max(1, int(0.75 * n))]
        entries = torch.rand(len(cells), N_GENES, generator=gen) <= 0.25
        self[n] = TissueMask(cells, entries)
        return self[n]

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(module_impl, "sample_mask", lambda n, *a, **k: self[n])


def _masks() -> FixedMasks:
    masks = FixedMasks()
    for n in SIZES:
        masks[n]
    return masks


def _module(latent: str, **kwargs) -> CellPLMModule:
    torch.manual_seed(0)
    module = CellPLMModule(
        n_vocab=N_GENES,
        n_hidden=32,
        n_layers=2,
        n_heads=4,
        n_latent=8,
        latent=latent,
        n_clusters=4,
        dropout=0.0,
        use_spatial_pe=True,
        n_labels=3,
        classification_ratio=2.0,
        **kwargs,
    )
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # includes the flow attention's fixed 0.01
    return module.train()


def _step(module: CellPLMModule, tensors: dict) -> tuple[dict, torch.Tensor]:
    inference, _, losses = module(tensors)
    return inference, losses.loss


def _grads(module: CellPLMModule) -> dict[str, torch.Tensor | None]:
    return {
        name: None if p.grad is None else p.grad.clone() for name, p in module.named_parameters()
    }


def _run_both(module, tissues, noise, latent_layer=None):
    """(packed outputs, packed loss, grads), (one-by-one outputs, mean loss, grads)."""
    count = None if latent_layer is None else latent_layer.kl_step_count.clone()
    noise.rewind()
    module.zero_grad(set_to_none=True)
    packed_out, packed_loss = _step(module, pack_minibatches(tissues))
    packed_loss.backward()
    packed = (packed_out, packed_loss.detach(), _grads(module))
    if latent_layer is not None:  # one warm-up step for the packed step
        assert int(latent_layer.kl_step_count) == int(count) + 1
    noise.rewind()
    module.zero_grad(set_to_none=True)
    outs, losses = [], []
    for tensors in tissues:
        if latent_layer is not None:  # every tissue at the packed step's warm-up step
            latent_layer.kl_step_count.copy_(count)
        out, loss = _step(module, tensors)
        (loss / len(tissues)).backward()
        outs.append(out)
        losses.append(loss.detach())
    return packed, (outs, torch.stack(losses).mean(), _grads(module))


def _assert_same(packed, one_by_one) -> None:
    (p_out, p_loss, p_grads), (outs, loss, grads) = packed, one_by_one
    for key in ("z", "qz_m", "qz_v", "h"):
        torch.testing.assert_close(
            p_out[key], torch.cat([o[key] for o in outs]), rtol=TOL, atol=TOL
        )
    torch.testing.assert_close(p_loss, loss, rtol=TOL, atol=TOL)
    assert {k for k, g in p_grads.items() if g is None} == {
        k for k, g in grads.items() if g is None
    }
    for name, g in grads.items():
        if g is not None:
            scale = max(1.0, float(g.abs().max()))
            torch.testing.assert_close(p_grads[name], g, rtol=TOL, atol=TOL * scale, msg=name)


def _per_tissue_latent_loss(module, tissues, noise, latent: str) -> list[float]:
    """Each tissue's latent loss with the floor off (VAE: the weighted KL)."""
    layer = module.latent.layers[1]
    lamda, count = layer.lamda, getattr(layer, "kl_step_count", torch.zeros(())).clone()
    layer.lamda = -float("inf")
    noise.rewind()
    values = []
    with torch.no_grad():
        for tensors in tissues:
            if latent == "vae":
                layer.kl_step_count.copy_(count)
            values.append(float(module(tensors)[0]["loss"]))
    layer.lamda = lamda
    if latent == "vae":
        layer.kl_step_count.copy_(count)
    return values


# ------------------------------------------------------------------------------ network


def test_flow_attention_never_crosses_tissues():
    """Interleaved rows of three tissues through the encoder = each tissue alone."""
    torch.manual_seed(0)
    encoder = FlowformerEncoder(32, 2, 4, dropout=0.0).eval()
    tissue_index = torch.tensor([0, 1, 2, 2, 1, 0, 2, 2, 1, 2, 0, 2, 1, 2, 2])
    x = torch.randn(len(tissue_index), 32) * 3
    packed = encoder(x, TissueSegments.from_index(tissue_index))
    for t in range(3):
        rows = tissue_index == t
        torch.testing.assert_close(packed[rows], encoder(x[rows]), rtol=TOL, atol=TOL)
    assert not torch.allclose(encoder(x)[tissue_index == 0], packed[tissue_index == 0])


def test_segments_reject_bad_ids():
    with pytest.raises(ValueError, match="0..T-1"):
        TissueSegments.from_index(torch.tensor([0, 2, 2]))  # tissue 1 has no row
    with pytest.raises(ValueError, match="0..T-1"):
        TissueSegments.from_index(torch.tensor([0, -1]))


# ------------------------------------------------------------------------------ module


@pytest.mark.parametrize("latent", ["gmvae", "vae"])
def test_packed_step_equals_tissues_one_by_one(latent, monkeypatch):
    """Same per-cell outputs, loss (mean of the per-tissue losses) and gradients."""
    masks = _masks()
    masks.install(monkeypatch)
    noise = RowNoise(sum(SIZES))
    noise.install(monkeypatch)
    kwargs = {"latent_kwargs": {"lamda": -1e9}} if latent == "gmvae" else {}
    module = _module(latent, **kwargs)
    layer = module.latent.layers[1]
    if latent == "vae":
        layer.lamda = -1e9  # every tissue above the floor
        layer.kl_step_count.fill_(5000)  # KL weight 0.5
    tissues = _tissues()
    packed, one_by_one = _run_both(module, tissues, noise, layer if latent == "vae" else None)
    _assert_same(packed, one_by_one)
    # the packed loss is not the loss of one big tissue
    noise.rewind()
    big = pack_minibatches(tissues)
    big.pop(TISSUE_INDEX_KEY)
    monkeypatch.setattr(
        module_impl,
        "sample_mask",
        lambda n, *a, **k: TissueMask(
            torch.cat([m.cells + o for m, o in zip(masks.values(), np.cumsum((0,) + SIZES))]),
            torch.cat([m.entries for m in masks.values()]),
        ),
    )
    with torch.no_grad():
        assert abs(float(_step(module, big)[1]) - float(packed[1])) > 1e-3


def test_packed_step_with_loss_mask(monkeypatch):
    """Within-tissue split (``"loss_mask"``, ``split_by="cells"``): the packed step still
    equals the tissues one by one, each NB mean over its masked cells inside the mask."""
    masks = _masks()
    masks.install(monkeypatch)
    noise = RowNoise(sum(SIZES))
    noise.install(monkeypatch)
    module = _module("gmvae")
    tissues = _tissues()
    rng = np.random.default_rng(1)
    for tensors in tissues:
        tensors[LOSS_MASK_KEY] = torch.as_tensor(rng.random(tensors[X_KEY].shape[0]) < 0.6)
    _assert_same(*_run_both(module, tissues, noise))


@pytest.mark.parametrize("latent", ["gmvae", "vae"])
def test_packed_free_bits_floor_per_tissue(latent, monkeypatch):
    """One tissue's KL below the floor, another's above: each tissue is floored alone, and a
    floor reached by every tissue leaves the parameters it alone reaches without gradient."""
    masks = _masks()
    masks.install(monkeypatch)
    noise = RowNoise(sum(SIZES))
    noise.install(monkeypatch)
    module = _module(latent)
    layer = module.latent.layers[1]
    if latent == "vae":
        layer.kl_step_count.fill_(5000)
    else:
        layer.w_en = 0.0  # the loss is then w_li * KL_gauss: one KL per tissue to read
    tissues = _tissues()
    kl = _per_tissue_latent_loss(module, tissues, noise, latent)
    if latent == "gmvae":
        kl = [v / layer.w_li for v in kl]  # KL_gauss
    assert len(set(np.round(kl, 4))) == 3, kl
    lo, mid, hi = sorted(kl)
    layer.lamda = (lo + mid) / 2  # the smallest KL is floored, the two others are not
    _assert_same(*_run_both(module, tissues, noise, layer if latent == "vae" else None))
    layer.lamda = hi + 1.0  # every tissue floored
    packed, one_by_one = _run_both(module, tissues, noise, layer if latent == "vae" else None)
    _assert_same(packed, one_by_one)
    if latent == "gmvae":  # the prior nets are reached by the floored term only
        assert packed[2]["latent.layers.1.inference.y_mu.weight"] is None


def test_packed_corpus_step(tmp_path, monkeypatch):
    """TissueCorpus(pack_tissues=True): tissues of several files in one step, each with its
    file's measured genes; the step equals its tissues read and run one by one."""
    vocab = official_config()["gene_list"][:N_GENES]
    rng = np.random.default_rng(0)
    files = []
    for k, (genes, spatial) in enumerate([(vocab[:30], False), (vocab[10:], True)]):
        adata = ad.AnnData(sp.csr_matrix(rng.poisson(0.8, (60, len(genes))).astype(np.float32)))
        adata.var_names = genes
        adata.obs_names = [f"f{k}_c{i}" for i in range(60)]
        if spatial:
            adata.obsm["spatial"] = rng.uniform(0, 50, (60, 2))
        adata.write_h5ad(tmp_path / f"f{k}.h5ad")
        files.append(tmp_path / f"f{k}.h5ad")
    dm = cp.data.TissueCorpus(
        files,
        vocabulary=vocab,
        spatial_key=[None, "spatial"],
        max_cells=15,
        validation_size=0.0,
        max_cells_per_step=80,
        pack_tissues=True,
        cache_dir=tmp_path / "cache",
    )
    sampler = dm.sampler("train")
    steps = list(sampler)
    assert len(steps) == len(sampler) < len(np.unique(dm.tissue_codes))

    def files_in(step) -> set[int]:
        return {int(np.searchsorted(dm.offsets, rows[0], side="right") - 1) for rows in step}

    step = max(steps, key=lambda st: len(files_in(st)))
    assert len(files_in(step)) == 2  # tissues of both files in one step
    tissues = [dm.dataset[rows] for rows in step]
    packed = dm.dataset[step]
    expected = pack_minibatches(tissues)
    assert packed.keys() == expected.keys()
    for key in packed:
        a, b = packed[key], expected[key]
        a, b = (t.to_dense() if t.layout == torch.sparse_csr else t for t in (a, b))
        torch.testing.assert_close(a, b, equal_nan=True)
    assert packed["measured"].shape == (len(step), N_GENES)
    for t, tensors in enumerate(tissues):
        assert torch.equal(packed["measured"][t], tensors["measured"])
    masks = FixedMasks()
    masks.install(monkeypatch)
    noise = RowNoise(packed[X_KEY].shape[0])
    noise.install(monkeypatch)
    module = _module("gmvae")  # the corpus minibatches carry their files' measured genes
    _assert_same(*_run_both(module, tissues, noise))


# ------------------------------------------------------------------------------ sampler


def _sampler(**kwargs) -> TissueBatchSampler:
    sizes = [3, 7, 7, 12, 20, 5, 9, 30, 4, 16, 11, 2]
    codes = np.repeat(np.arange(len(sizes)), sizes)
    indices = np.random.default_rng(0).permutation(len(codes)) + 100
    return TissueBatchSampler(indices, codes[indices - 100], shuffle=True, **kwargs)


def test_sampler_packs_whole_tissues_within_the_budget():
    kwargs = {"max_cells": 25, "drop_node_rate": 0.3, "pack_tissues": True, "seed": 3}
    sampler = _sampler(**kwargs)
    tissue_of = {int(r): k for k, t in enumerate(sampler.tissues) for r in t}
    expected = [min(25, max(1, int(len(t) * 0.7))) for t in sampler.tissues]  # drop, then cap
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        steps = list(sampler)
        assert len(steps) == len(sampler)  # fixed number of steps, as Lightning is told
        seen = []
        for step in steps:
            assert sum(len(rows) for rows in step) <= 25
            for rows in step:
                codes = {tissue_of[r] for r in rows}
                assert len(codes) == 1 and len(set(rows)) == len(rows)
                (code,) = codes
                assert len(rows) == expected[code]
                seen.append(code)
        assert sorted(seen) == list(range(len(sampler.tissues)))  # every tissue once
        assert len(steps) < len(sampler.tissues)  # packing happened
        epochs.append(steps)
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    again = _sampler(**kwargs)
    again.set_epoch(1)
    assert list(again) == epochs[1]  # deterministic per seed and epoch


def test_pack_steps_fixed_count_random_groups():
    """The same number of steps for every draw; random groups where the budget leaves room,
    the largest-first packing where it does not."""
    sizes = np.array([15, 15, 15, 15, 12, 12, 12, 8, 4, 12])
    for budget, random_groups in ((80, True), (60, False)):
        draws = [pack_steps(sizes, budget, np.random.default_rng(seed)) for seed in range(20)]
        assert {len(steps) for steps in draws} == {2}
        for steps in draws:
            assert sorted(np.concatenate(steps)) == list(range(len(sizes)))
            assert max(sizes[step].sum() for step in steps) <= budget
        groups = {frozenset(frozenset(step.tolist()) for step in steps) for steps in draws}
        assert (len(groups) > 1) == random_groups


def test_sampler_packed_steps_shared_across_ranks():
    kwargs = {"max_cells": 25, "pack_tissues": True}
    ranks = [_sampler(num_replicas=2, rank=r, **kwargs) for r in range(2)]
    steps = [list(s) for s in ranks]
    assert len(steps[0]) == len(steps[1]) == len(ranks[0])
    n_single = len(list(_sampler(**kwargs)))
    assert len(steps[0]) + len(steps[1]) - n_single <= 1  # at most world_size - 1 repeated
    tissue_of = {int(r): k for k, t in enumerate(ranks[0].tissues) for r in t}
    seen = {tissue_of[rows[0]] for rank in steps for step in rank for rows in step}
    assert seen == set(range(len(ranks[0].tissues)))  # every tissue seen in the epoch


def test_sampler_refuses_packing_outside_training():
    with pytest.raises(ValueError, match="training"):
        _sampler(max_cells=25).__class__([0, 1], [0, 0], shuffle=False, pack_tissues=True)
    with pytest.raises(ValueError, match="budget"):
        _sampler(pack_tissues=True)


# ------------------------------------------------------------------------------ model


def test_train_with_packing_smoke():
    adata = cp.datasets.simulate_tissue(n_cells=400, n_slides=1, seed=0)
    cp.CellPLM.setup_anndata(
        adata, layer="counts", spatial_key="spatial", library_key="slide", max_cells=40
    )
    scvi.settings.seed = 0
    model = cp.CellPLM(adata, n_hidden=32, n_layers=1, n_heads=4, n_latent=8)
    with pytest.raises(ValueError, match="budget"):
        model.train(max_epochs=1, batch_size=None, pack_tissues=True)
    with pytest.raises(ValueError, match="datamodule"):
        model.train(max_epochs=1, pack_tissues=True, datamodule=object())
    model.train(
        max_epochs=2,
        batch_size=160,
        pack_tissues=True,
        train_size=0.8,
        accelerator="cpu",
        enable_progress_bar=False,
        check_val_every_n_epoch=1,
    )
    for key in ("train_loss", "validation_loss"):
        assert np.isfinite(model.history[key].to_numpy(dtype=float)).all()
    splitter = cp.data.TissueDataSplitter(
        model.adata_manager, train_size=0.8, max_cells_per_step=160, pack_tissues=True
    )
    loader = splitter.train_dataloader()
    n_train_tissues = len(
        np.unique(adata.obs["_cellplm_tissue_code"].to_numpy()[splitter.train_idx])
    )
    assert len(loader) < n_train_tissues  # fewer steps than tissues
    batch = next(iter(loader))
    n_tissues = int(batch[TISSUE_INDEX_KEY].max()) + 1
    assert n_tissues > 1 and batch[X_KEY].shape[0] <= 160
    assert batch[TISSUE_INDEX_KEY].shape == (batch[X_KEY].shape[0],)
    latent = model.get_latent_representation()
    assert latent.shape == (adata.n_obs, 8) and np.isfinite(latent).all()
