"""Training-mode parity with the official CellPLM code, and the official objective details.

Both models hold the same random weights (an official ``OmicsFormer`` built from a small config,
saved in the official format, loaded with :meth:`CellPLM.load_official`). One training step is
run on both with

- the **same mask**: ours through ``cellplm_scvi.module._cellplm.sample_mask`` (monkeypatched),
  the official one through its mask builder's ``apply_mask`` (replaced; it builds
  ``masked_x_seq`` with the official ``simple_mask``), so neither draws random numbers for it;
- the **same seed** right before the forward pass. Both codes then draw their random numbers in
  the same order and shapes (embedder dropout, encoder dropouts layer by layer, Gumbel uniform
  noise, reparameterisation normal noise, decoder dropout), so with dropout on the dropout masks
  are identical too: dropout-on runs are compared exactly, not statistically.

Compared: the loss (relative 1e-5), the latent loss, which parameters receive a gradient (the
same set: a floored official term leaves its parameters with ``grad is None``) and every
gradient (norm-relative per tensor, 1e-4; scalar PReLU slopes 1e-3, see ``GRAD_RTOL_SCALAR``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import cellplm_scvi as cp
import cellplm_scvi.module._cellplm as module_impl
from cellplm_scvi.data import TissueDataLoader
from cellplm_scvi.module._masking import TissueMask
from cellplm_scvi.nn._latent import GMVAELatent, VAELatent, _log_normal
from tests._helpers import (
    build_official,
    one_tissue_adata,
    random_counts,
    save_official,
    small_config,
    to_coo,
)

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
# A one-element gradient (a PReLU slope) is a sum over all N x d activations with cancellations;
# its float32 rounding differs between two codes that add in different orders. Measured up to
# 1.7e-4 (seed 0, GMVAE, dropout off); every tensor with more than one element stays < 4e-5.
GRAD_RTOL_SCALAR = 1e-3
N_CELLS, N_GENES = 120, 300
N_BATCHES = 7  # small_config's batch_num

# latent configurations: (latent_mod, config overrides, official VAE warm-up step)
CASES = {
    "gmvae_floored": ("gmvae", {}, 0),  # lamda 5 > KL: both floors active, prior nets untouched
    "gmvae_free": ("gmvae", {"lamda": 0.01}, 0),  # neither floor active
    "vae_first_step": ("vae", {}, 0),  # official KL weight 0 at the first step
    "vae_warm": ("vae", {}, 5000),  # KL weight 0.5: the weighted KL exceeds lamda = 1
}


# ------------------------------------------------------------------------------------ helpers


def fixed_mask(seed: int) -> tuple[TissueMask, torch.Tensor]:
    """75% of the cells, 25% of their entries; as our ``TissueMask`` and a dense (N, G) bool."""
    gen = torch.Generator().manual_seed(seed)
    cells = torch.randperm(N_CELLS, generator=gen)[: int(0.75 * N_CELLS)]
    entries = torch.rand(len(cells), N_GENES, generator=gen) <= 0.25
    dense = torch.zeros(N_CELLS, N_GENES, dtype=torch.bool)
    dense[cells] = entries
    return TissueMask(cells, entries), dense


def inject_official_mask(official: nn.Module, dense: torch.Tensor) -> None:
    """Make the official mask builder apply ``dense`` instead of drawing a mask."""
    from CellPLM.utils.sparse import simple_mask

    def apply_mask(x_dict: dict) -> dict:
        x_dict["masked_x_seq"] = simple_mask(x_dict["x_seq"].coalesce(), dense)
        x_dict["input_mask"] = dense.int()
        return x_dict

    official.mask_model.apply_mask = apply_mask


def set_dropout(modules: list[nn.Module], on: bool, p: dict) -> None:
    for module in modules:
        for name, m in module.named_modules():
            if isinstance(m, nn.Dropout):
                m.p = p.setdefault((id(module), name), m.p) if on else 0.0


def advance_official_warmup(official: nn.Module, steps: int) -> None:
    layer = official.latent.layers[1]
    for _ in range(steps):  # the official schedule, step by step (float accumulation included)
        layer.kl_schedule_step()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def build_pair(case: str, tmp_path, seed: int = 0):
    """(official model, our model, counts, our tensors) with the same random weights."""
    pytest.importorskip("CellPLM")
    latent_mod, overrides, warm = CASES[case]
    config = {**small_config(latent_mod), **overrides}
    official = build_official(config, seed=seed)
    prefix = save_official(official, config, tmp_path, "small")
    counts = random_counts(N_CELLS, N_GENES, 0.2, seed=seed)
    model = cp.CellPLM.load_official(prefix, one_tissue_adata(counts, config["gene_list"]))
    tensors = next(iter(TissueDataLoader(model.adata_manager, batch_size=None)))
    if warm:
        advance_official_warmup(official, warm)
        model.module.latent.layers[1].kl_step_count.fill_(warm)
    return official, model, counts, tensors


def official_step(official, counts, batch=None, seed=3):
    x_dict = {
        "x_seq": to_coo(counts),
        "coord": -torch.ones(N_CELLS, 2),
        "gene_mask": torch.arange(N_GENES),
    }
    if batch is not None:
        x_dict["batch"] = batch
    official.train()
    official.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out, loss = official(x_dict)
    loss.backward()
    return float(loss), float(out["latent_loss"])


def our_step(module, tensors, seed=3):
    module.train()
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    _, _, loss_output = module(tensors)  # scvi's BaseModuleClass.forward
    loss_output.loss.backward()
    return float(loss_output.loss), float(loss_output.extra_metrics["latent_loss"])


# ------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("batch_covariate", [False, True], ids=["no_batch", "batch"])
@pytest.mark.parametrize("dropout", [False, True], ids=["dropout_off", "dropout_on"])
@pytest.mark.parametrize("case", list(CASES))
def test_training_step_matches_official(case, dropout, batch_covariate, tmp_path, monkeypatch):
    official, model, counts, tensors = build_pair(case, tmp_path)
    module = model.module
    mask, dense = fixed_mask(seed=5)
    monkeypatch.setattr(module_impl, "sample_mask", lambda *args, **kwargs: mask)
    inject_official_mask(official, dense)
    set_dropout([official, module], dropout, {})
    batch = None
    if batch_covariate:  # indices into the official (pretraining) batch table
        batch = torch.from_numpy(np.random.default_rng(0).integers(0, N_BATCHES, N_CELLS))
        tensors = {**tensors, cp._constants.BATCH_KEY: batch[:, None]}
        module.use_batch_covariate = True

    loss_off, latent_off = official_step(official, counts, batch)
    loss_ours, latent_ours = our_step(module, tensors)

    grads_ours = {n: p.grad for n, p in module.named_parameters()}
    grads_off = {n: p.grad for n, p in official.named_parameters() if n in grads_ours}
    with_grad_off = {n for n, g in grads_off.items() if g is not None}
    with_grad_ours = {n for n, g in grads_ours.items() if g is not None}
    worst = {n: rel(grads_ours[n], grads_off[n]) for n in with_grad_off & with_grad_ours}
    top = max(worst, key=worst.get)
    print(
        f"[{case} dropout={dropout} batch={batch_covariate}] loss official {loss_off:.6f} ours "
        f"{loss_ours:.6f} (rel {abs(loss_ours / loss_off - 1):.1e}); latent {latent_off:.6f} vs "
        f"{latent_ours:.6f}; max grad rel {worst[top]:.1e} ({top}); "
        f"{len(with_grad_ours)} tensors with gradients"
    )
    assert loss_ours == pytest.approx(loss_off, rel=LOSS_RTOL)
    assert latent_ours == pytest.approx(latent_off, rel=LOSS_RTOL, abs=1e-6)
    assert with_grad_ours == with_grad_off
    prior = {n for n in grads_ours if ".y_mu." in n or ".y_var." in n}
    if case == "gmvae_floored":  # the floored prior nets get no gradient (AdamW skips them)
        assert prior and not prior & with_grad_ours
    elif case == "gmvae_free":
        assert prior <= with_grad_ours
    for name, value in worst.items():
        tol = GRAD_RTOL_SCALAR if grads_ours[name].numel() == 1 else GRAD_RTOL
        assert value <= tol, (name, value)


# ------------------------------------------------------------------------------------ VAE warm-up


def test_vae_warmup_follows_the_official_schedule():
    pytest.importorskip("CellPLM")
    from CellPLM.latent.autoencoders import VAELatentLayer

    official = VAELatentLayer(8, 4, warmup_step=20).train()
    ours = VAELatent(8, 4, kl_warmup_steps=20).train()
    h = torch.randn(5, 8)
    weights = []
    for _ in range(25):  # past the end of the warm-up
        weights.append((float(ours.kl_weight()), official.kl_weight))
        official({"h": h})
        ours(h)
    ours_w, official_w = np.array(weights).T
    np.testing.assert_allclose(ours_w, official_w, rtol=1e-6, atol=1e-12)
    assert ours_w[0] == 0.0 and ours_w[-1] == pytest.approx(19 / 20)  # never reaches 1
    assert int(ours.kl_step_count) == official.step_count == 25
    ours.eval()
    out = ours(h)  # evaluation: no step, loss 0
    assert int(ours.kl_step_count) == 25 and float(out["loss"]) == 0.0
    assert VAELatent(8, 4, kl_warmup_steps=0).kl_weight() == 1.0
    with pytest.raises(ValueError, match="kl_warmup_steps"):
        VAELatent(8, 4, kl_warmup_steps=1)


def test_vae_warmup_counter_is_model_state(tmp_path):
    layer = VAELatent(8, 4).train()
    for _ in range(3):
        layer(torch.randn(5, 8))
    state = layer.state_dict()
    assert int(state["kl_step_count"]) == 3
    resumed = VAELatent(8, 4)
    resumed.load_state_dict(state)  # strict
    assert int(resumed.kl_step_count) == 3
    without = {k: v for k, v in state.items() if k != "kl_step_count"}
    fresh = VAELatent(8, 4)
    fresh.load_state_dict(without)  # strict, e.g. a state saved before the counter existed
    assert int(fresh.kl_step_count) == 0

    # an official checkpoint holds no counter: it loads strictly and starts at step 0; training
    # advances the counter once per training step and save/load keeps it
    official, model, _, _ = build_pair("vae_first_step", tmp_path)
    assert not any("kl_step_count" in k for k in official.state_dict())
    layer = model.module.latent.layers[1]
    assert int(layer.kl_step_count) == 0
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "train_size": 1.0}
    model.train(max_epochs=2, **quiet)  # one tissue: one step per epoch
    assert int(layer.kl_step_count) == 2
    model.save(str(tmp_path / "saved"), overwrite=True)
    loaded = cp.CellPLM.load(str(tmp_path / "saved"), adata=model.adata)
    assert int(loaded.module.latent.layers[1].kl_step_count) == 2


# ------------------------------------------------------------------------------------ floors


def test_floored_prior_nets_are_not_updated(tmp_path, monkeypatch):
    _, model, _, tensors = build_pair("gmvae_floored", tmp_path)
    module = model.module
    mask, _ = fixed_mask(seed=5)
    monkeypatch.setattr(module_impl, "sample_mask", lambda *args, **kwargs: mask)
    layer = module.latent.layers[1]
    prior_ids = {id(p) for p in layer.prior_parameters()}
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.5)
    our_step(module, tensors)
    assert all(p.grad is None for p in layer.prior_parameters())
    optimizer.step()  # a zero gradient would still decay (and move) them
    for name, p in module.named_parameters():
        if id(p) in prior_ids:  # neither moved nor decayed
            assert torch.equal(p.detach(), before[name]), name
    assert not torch.equal(
        layer.inference.inference_qzyx[0].weight.detach(),
        before["latent.layers.1.inference.inference_qzyx.0.weight"],
    )


@pytest.mark.parametrize("case", ["gmvae_floored", "gmvae_free"])
def test_floors_under_torch_distributed(case, tmp_path, monkeypatch):
    """Under torch.distributed a floored term keeps zero gradients (DDP needs every parameter
    in every backward pass); ``drop_floored_gradients`` then turns them into ``None``."""
    import torch.distributed as dist

    _, model, _, tensors = build_pair(case, tmp_path)
    module = model.module
    mask, _ = fixed_mask(seed=5)
    monkeypatch.setattr(module_impl, "sample_mask", lambda *args, **kwargs: mask)
    layer = module.latent.layers[1]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        our_step(module, tensors)
    finally:
        dist.destroy_process_group()
    grads = [p.grad for p in layer.prior_parameters()]
    assert all(g is not None for g in grads)
    assert all(not g.any() for g in grads) == (case == "gmvae_floored")
    layer.drop_floored_gradients()
    assert all(p.grad is None for p in layer.prior_parameters()) == (case == "gmvae_floored")


# ------------------------------------------------------------------------------------ evaluation


def deterministic_official_clusters(official: nn.Module) -> None:
    """Official evaluation with ``y = one_hot(argmax logits)`` (ours) instead of a Gumbel draw."""
    gumbel = official.latent.layers[1].inference.inference_qyx[0]
    monkey = lambda logits, temperature, hard=False: nn.functional.one_hot(  # noqa: E731
        logits.argmax(-1), logits.shape[-1]
    ).to(logits.dtype)
    gumbel.gumbel_softmax = monkey


@pytest.mark.parametrize("case", ["gmvae_floored", "vae_warm"])
def test_evaluation_loss_matches_official(case, tmp_path):
    official, model, counts, tensors = build_pair(case, tmp_path)
    module = model.module.eval()
    official.eval()
    if case.startswith("gmvae"):
        deterministic_official_clusters(official)
    x_dict = {
        "x_seq": to_coo(counts),
        "coord": -torch.ones(N_CELLS, 2),
        "gene_mask": torch.arange(N_GENES),
    }
    with torch.no_grad():
        out, loss_off = official(x_dict)
        _, _, loss_output = module(tensors)
    latent = float(loss_output.extra_metrics["latent_loss"])
    print(f"[{case} eval] loss official {float(loss_off):.6f} ours {float(loss_output.loss):.6f}")
    assert latent == pytest.approx(out["latent_loss"], abs=1e-6)
    assert float(loss_output.loss) == pytest.approx(float(loss_off), rel=LOSS_RTOL)
    if case.startswith("gmvae"):
        assert latent == 50.0  # both floors: 5 * 5 + 5 * 5, in evaluation too


def test_evaluation_gaussian_kl_is_the_expected_one_sample_estimate():
    layer = GMVAELatent(6, 3, n_clusters=4, lamda=0.0).eval()
    h = torch.randn(4, 6)
    with torch.no_grad():
        out = layer(h)
        y = nn.functional.one_hot(layer.cluster_logits(h).argmax(-1), 4).float()
        qz_m, qz_v = layer.posterior(h, y)
        pz_m, pz_v = layer.prior(y)
        z = qz_m + torch.randn(200_000, *qz_m.shape) * (qz_v + 1e-10).sqrt()
        estimate = (_log_normal(z, qz_m, qz_v) - _log_normal(z, pz_m, pz_v)).mean(0)
        kl_cat = (out["y_probs"] * out["y_probs"].log()).sum(-1) + np.log(4)
    np.testing.assert_allclose(out["kl"] - kl_cat, estimate, rtol=2e-2, atol=2e-3)
    expected_loss = 5 * (out["kl"] - kl_cat).mean() + 5 * kl_cat.mean()
    assert float(out["loss"]) == pytest.approx(float(expected_loss), rel=1e-5)
