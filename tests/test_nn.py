"""Tests of the network blocks (``cellplm_scvi.nn``), the NB objective and the input masking.

Where the official CellPLM package defines the same block, outputs are compared with it after
copying the weights (our attribute names follow the official state dict).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from CellPLM.layer.flowformer import Flow_Attention
from CellPLM.layer.flowformer import FlowformerLayer as OfficialFlowformerLayer
from CellPLM.objective.zinb import NBReconstructionLoss
from CellPLM.utils.pe import Sinusoidal2dPE as OfficialSinusoidal2dPE
from torch import nn
from torch.profiler import ProfilerActivity, profile

from cellplm_scvi.module._loss import masked_nb_loss, nb_nll, rescale_to_library
from cellplm_scvi.module._masking import TissueMask, apply_mask, sample_mask
from cellplm_scvi.nn import (
    CellEmbedder,
    FlowAttention,
    FlowformerEncoder,
    GMVAELatent,
    NBDecoder,
    NBHead,
    Sinusoidal2dPE,
    VAELatent,
    sinusoidal_2d_table,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _random_counts(n: int, g: int, density: float = 0.3, empty_rows=()) -> torch.Tensor:
    """Dense float32 counts with ~``density`` non-zeros (and the given all-zero rows)."""
    x = torch.poisson(torch.full((n, g), 4.0)) * (torch.rand(n, g) < density)
    x[list(empty_rows)] = 0.0
    return x


# --------------------------------------------------------------------------- Flow-Attention
@pytest.mark.parametrize("n_heads", [1, 4])
def test_flow_attention_matches_official(n_heads):
    d, n = 32, 57
    ours = FlowAttention(d, n_heads).eval()
    theirs = Flow_Attention(d, n_heads).eval()
    theirs.load_state_dict(ours.state_dict())  # same attribute names
    x = torch.randn(n, d) * 2.0
    with torch.no_grad():
        expected = theirs(x.unsqueeze(0))[0]
        got = ours(x)
    assert got.shape == (n, d)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_flowformer_encoder_matches_official_layers():
    d, n_heads, n_layers, n = 32, 4, 2, 40
    ours = FlowformerEncoder(d, n_layers, n_heads, dropout=0.1).eval()
    theirs = nn.Module()
    theirs.layers = nn.ModuleList(
        OfficialFlowformerLayer(d, n_heads, dropout=0.1) for _ in range(n_layers)
    )
    theirs.load_state_dict(ours.state_dict())  # strict: every key matches
    theirs.eval()
    x = torch.randn(n, d)
    with torch.no_grad():
        expected = x
        for layer in theirs.layers:
            expected = layer(expected)
        got = ours(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", ["attention", "encoder"])
def test_flow_permutation_equivariant_over_cells(block):
    d, n = 32, 64
    if block == "attention":
        module = FlowAttention(d, 4).eval()
    else:
        module = FlowformerEncoder(d, n_layers=2, n_heads=4, dropout=0.1).eval()
    x = torch.randn(n, d)
    perm = torch.randperm(n)
    with torch.no_grad():
        out = module(x)
        out_perm = module(x[perm])
    torch.testing.assert_close(out_perm, out[perm], atol=1e-5, rtol=1e-5)
    # cells interact: changing one cell changes the others (not a per-cell MLP)
    x2 = x.clone()
    x2[0] = torch.randn(d) * 3.0  # (a constant shift would be removed by the LayerNorm)
    with torch.no_grad():
        out2 = module(x2)
    assert not torch.allclose(out2[1:], out[1:], atol=1e-6)


def _largest_op_allocation(fn, x: torch.Tensor) -> int:
    """Bytes of the largest net allocation made inside any single op while ``fn(x)`` runs.

    Method: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free
    of the CPU allocator (tracemalloc does not see torch's allocator, and peak RSS is a
    process-wide high-water mark that earlier tests may already have raised). Each op event's
    ``self_cpu_memory_usage`` is the bytes allocated minus freed within that op, so any tensor
    created by an op (including internal buffers such as a bmm output inside an einsum) shows
    up at its full size. The maximum over events is therefore a lower bound on the largest
    single tensor, which is all we need to rule out an N x N matrix.
    """
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(x)
    return max(e.self_cpu_memory_usage for e in prof.events())


def test_memory_measurement_detects_n_by_n():
    """Control for the method above: naive softmax attention is caught."""
    n, d = 2000, 32

    def naive_attention(x):
        return torch.softmax(x @ x.T, dim=-1) @ x

    assert _largest_op_allocation(naive_attention, torch.randn(n, d)) >= n * n * 4


@pytest.mark.parametrize("block", ["attention", "encoder"])
def test_flow_allocates_no_n_by_n(block):
    n, d = 20_000, 32
    if block == "attention":
        module = FlowAttention(d, 4).eval()
    else:
        module = FlowformerEncoder(d, n_layers=1, n_heads=4, dropout=0.0).eval()
    largest = _largest_op_allocation(module, torch.randn(n, d))
    assert largest > 0  # the profiler did record the forward
    assert largest < n * n * 4 / 100, f"largest allocation {largest} bytes"
    # O(N d): a few (N, 2d) activations at most
    assert largest <= 4 * n * 2 * d * 4


# --------------------------------------------------------------------------- embedder
def _manual_group_norm(h: torch.Tensor, gn: nn.GroupNorm, groups: int = 4) -> torch.Tensor:
    """GroupNorm with 4 contiguous channel groups and eps 1e-5 (spec 1.2), written out."""
    n, d = h.shape
    g = h.view(n, groups, d // groups)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-5)
    return g.view(n, d) * gn.weight + gn.bias


def _manual_embed(embedder: CellEmbedder, x_dense, gene_index, pe=None) -> torch.Tensor:
    linear, gn = embedder.extra_linear[0], embedder.extra_linear[3]
    table = embedder.feat_enc.emb if gene_index is None else embedder.feat_enc.emb[gene_index]
    feat = torch.log1p(x_dense) @ table
    if pe is not None:
        feat = feat + pe
    return _manual_group_norm(torch.relu(feat @ linear.weight.T + linear.bias), gn)


@pytest.fixture
def embedder():
    emb = CellEmbedder(n_vocab=40, n_hidden=72, dropout=0.5)  # > 2 gather blocks, one partial
    with torch.no_grad():  # non-trivial affine and gene table
        emb.feat_enc.emb.normal_()
        emb.extra_linear[3].weight.uniform_(0.5, 2.0)
        emb.extra_linear[3].bias.normal_()
    return emb.eval()


def _csr(x: torch.Tensor, index_dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """CSR tensor of ``x`` with the given index dtype (the loader passes scipy's int32)."""
    csr = x.to_sparse_csr()
    return torch.sparse_csr_tensor(
        csr.crow_indices().to(index_dtype),
        csr.col_indices().to(index_dtype),
        csr.values(),
        x.shape,
    )


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("grad", [False, True])  # one embedding_bag call vs column blocks
@pytest.mark.parametrize("vocabulary_columns", [False, True])  # gene_index None: no remapping
def test_embedder_csr_matches_dense_formula(embedder, index_dtype, grad, vocabulary_columns):
    n_genes = 40 if vocabulary_columns else 25
    x = _random_counts(12, n_genes, empty_rows=[3])
    gene_index = None if vocabulary_columns else torch.randperm(40)[:25]
    with torch.set_grad_enabled(grad):
        got = embedder(_csr(x, index_dtype), gene_index)
    with torch.no_grad():
        expected = _manual_embed(embedder, x, gene_index)
    assert got.shape == (12, 72)
    torch.testing.assert_close(got.detach(), expected, atol=1e-5, rtol=1e-5)


def test_embedder_vocabulary_columns_without_gene_index(embedder):
    x = _random_counts(10, 40)
    with torch.no_grad():
        got = embedder(x.to_sparse_csr())
        expected = _manual_embed(embedder, x, None)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_embedder_dense_equals_csr(embedder):
    x = _random_counts(15, 30)
    gene_index = torch.randperm(40)[:30]
    with torch.no_grad():
        dense = embedder(x, gene_index)
        csr = embedder(x.to_sparse_csr(), gene_index)
    torch.testing.assert_close(csr, dense, atol=1e-5, rtol=1e-5)


def test_embedder_invariant_to_gene_order(embedder):
    x = _random_counts(15, 30)
    gene_index = torch.randperm(40)[:30]
    perm = torch.randperm(30)
    assert not torch.equal(perm, torch.arange(30))
    with torch.no_grad():
        out = embedder(x.to_sparse_csr(), gene_index)
        out_perm = embedder(x[:, perm].to_sparse_csr(), gene_index[perm])
        # sanity: permuting only the columns (not the index) does change the tokens
        out_wrong = embedder(x[:, perm].to_sparse_csr(), gene_index)
    torch.testing.assert_close(out_perm, out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out_wrong, out, atol=1e-3)


def test_embedder_gradient_reaches_gene_table_through_csr(embedder):
    x = _random_counts(20, 25)
    x[:, 0] = 0.0  # a gene never expressed
    gene_index = torch.randperm(40)[:25]
    weights = torch.randn(20, 72)

    def grad(inp):
        embedder.zero_grad()
        (embedder(inp, gene_index) * weights).sum().backward()
        return embedder.feat_enc.emb.grad.clone()

    g_csr = grad(x.to_sparse_csr())
    g_dense = grad(x)
    torch.testing.assert_close(g_csr, g_dense, atol=1e-5, rtol=1e-4)
    outside = torch.ones(40, dtype=torch.bool)
    outside[gene_index] = False
    assert torch.all(g_csr[outside] == 0)
    assert torch.all(g_csr[gene_index[0]] == 0)  # zero counts contribute nothing
    expressed = gene_index[x.sum(0) > 0]
    assert torch.all(g_csr[expressed].abs().sum(1) > 0)


@pytest.mark.parametrize("d", [16, 32])
def test_sinusoidal_table_matches_official(d):
    official = OfficialSinusoidal2dPE(d).pe_enc.weight
    torch.testing.assert_close(sinusoidal_2d_table(d), official, atol=1e-6, rtol=0)
    torch.testing.assert_close(Sinusoidal2dPE(d).pe_enc.weight, official, atol=1e-6, rtol=0)
    assert not Sinusoidal2dPE(d).pe_enc.weight.requires_grad  # frozen, as official


def _official_and_ours_pe(d: int = 16):
    theirs = OfficialSinusoidal2dPE(d)
    ours = Sinusoidal2dPE(d)
    ours.load_state_dict(theirs.state_dict())  # same keys: missing_pe, pe_enc.weight
    return ours, theirs


def test_sinusoidal_forward_matches_official():
    ours, theirs = _official_and_ours_pe()
    edges = torch.tensor(
        [[0.3, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.5, 0.5], [0.0098, 0.9902], [0.01, 0.2]]
    )
    coords = torch.cat([edges, torch.rand(300, 2)])
    got = ours(coords)
    expected = theirs(coords)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert len(torch.unique(got, dim=0)) > 100  # distinct positions get distinct codes


def test_sinusoidal_missing_coordinates():
    ours, theirs = _official_and_ours_pe()
    n = 6
    all_missing = ours(torch.full((n, 2), float("nan")))
    torch.testing.assert_close(all_missing, theirs(torch.full((n, 2), -1.0)), atol=0, rtol=0)
    # mixed: NaN rows get missing_pe, the others the official code of their own position
    coords = torch.rand(n, 2)
    coords[[1, 4]] = float("nan")
    coords[2, 0] = float("nan")  # one NaN coordinate is enough to be missing
    got = ours(coords)
    missing = torch.tensor([False, True, True, False, True, False])
    torch.testing.assert_close(got[missing], ours.missing_pe.expand(3, -1), atol=0, rtol=0)
    torch.testing.assert_close(got[~missing], theirs(coords[~missing]), atol=0, rtol=0)


def test_embedder_adds_spatial_encoding(embedder):
    x = _random_counts(8, 25)
    gene_index = torch.randperm(40)[:25]
    coords = torch.rand(8, 2)
    coords[5] = float("nan")
    with torch.no_grad():
        got = embedder(x.to_sparse_csr(), gene_index, coords)
        expected = _manual_embed(embedder, x, gene_index, embedder.pe_enc(coords))
        without = embedder(x.to_sparse_csr(), gene_index)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, without)


# --------------------------------------------------------------------------- latent layers
def test_vae_eval_returns_mu_deterministically():
    vae = VAELatent(16, 8).eval()
    h = torch.randn(30, 16) * 3
    with torch.no_grad():
        out1, out2 = vae(h), vae(h)
        mu = vae.hid_2mu(h)
        var = vae.hid_2sigma(h).clamp(-5, 5).exp() + 1e-4
    torch.testing.assert_close(out1["z"], mu)
    torch.testing.assert_close(out1["qz_m"], mu)
    torch.testing.assert_close(out1["qz_v"], var)
    assert torch.equal(out1["z"], out2["z"])


def test_vae_training_kl_and_floor():
    h = torch.randn(50, 16) * 3
    vae = VAELatent(16, 8, lamda=0.0, kl_warmup_steps=0).train()
    out = vae(h)
    mu, var = out["qz_m"], out["qz_v"]
    kl = -0.5 * (1 + var.log() - mu.pow(2) - var).sum(-1)
    torch.testing.assert_close(out["kl"], kl)
    torch.testing.assert_close(out["loss"], kl.mean())
    assert out["loss"] > 0
    assert not torch.allclose(out["z"], mu)  # sampled in training
    assert not torch.allclose(vae(h)["z"], out["z"])
    # free bits: a KL below lamda counts as 0
    vae.lamda = float(kl.mean().detach()) + 1.0
    assert float(vae(h)["loss"].detach()) == 0.0


@pytest.fixture
def gmvae_input():
    h = torch.randn(64, 16) * 2
    return h


def test_gmvae_eval_deterministic_and_uses_argmax_cluster(gmvae_input):
    h = gmvae_input
    gm = GMVAELatent(16, 8, n_clusters=5).eval()
    with torch.no_grad():
        out1, out2 = gm(h), gm(h)
        logits = gm.inference.inference_qyx[0].logits(h)
        y = F.one_hot(logits.argmax(-1), 5).float()
        mu, var = gm.posterior(h, y)
        # posterior formula, written out
        lin, _, gauss = gm.inference.inference_qzyx
        u = torch.relu(lin(torch.cat([h, y], 1)))
        mu_manual, var_manual = gauss.mu(u), F.softplus(gauss.var(u))
        mu_other, _ = gm.posterior(h, y.roll(1, dims=1))
    assert torch.equal(out1["z"], out2["z"])
    torch.testing.assert_close(out1["z"], mu)
    torch.testing.assert_close(out1["qz_m"], mu)
    torch.testing.assert_close(out1["qz_v"], var)
    torch.testing.assert_close(out1["y_probs"], logits.softmax(-1))
    torch.testing.assert_close(mu, mu_manual)
    torch.testing.assert_close(var, var_manual)
    assert not torch.allclose(mu_other, mu)  # the chosen cluster matters


def test_gmvae_training_loss_floors(gmvae_input):
    h = gmvae_input
    gm = GMVAELatent(16, 8, n_clusters=16, lamda=5.0, w_li=5.0, w_en=5.0).train()
    out = gm(h)
    assert float(out["loss"]) >= 5.0 * 5.0 + 5.0 * 5.0 - 1e-4
    assert out["loss"].requires_grad == (float(out["loss"]) > 50.0)  # floored terms: constants
    assert not torch.equal(gm(h)["z"], out["z"])  # sampled in training
    # the categorical term alone: KL(q(y|h) || U) <= log K < lamda = 5, so it sits on its floor
    gm.w_li, gm.w_en = 0.0, 1.0
    assert float(gm(h)["loss"]) == pytest.approx(5.0, abs=1e-6)


def test_gmvae_categorical_kl_bounded_by_log_k(gmvae_input):
    h = gmvae_input
    k = 8
    gm = GMVAELatent(16, 8, n_clusters=k, lamda=0.0, w_li=0.0, w_en=1.0).train()
    loss = float(gm(h)["loss"])
    assert 0.0 <= loss <= math.log(k) + 1e-6
    with torch.no_grad():  # peaked q(y|h): the KL approaches log K but never exceeds it
        gm.inference.inference_qyx[0].logits.weight.mul_(200.0)
    peaked = gm(h)
    assert 0.8 * math.log(k) < float(peaked["loss"]) <= math.log(k) + 1e-6
    assert torch.isfinite(peaked["kl"]).all()  # p log p with p -> 0 stays finite


def test_gmvae_gaussian_term(gmvae_input):
    """With w_en = 0 the loss is the floored mean of the Gaussian part of the per-cell KL."""
    h = gmvae_input
    k = 8
    gm = GMVAELatent(16, 8, n_clusters=k, lamda=0.0, w_li=1.0, w_en=0.0).train()
    out = gm(h)
    probs = out["y_probs"]
    kl_cat = torch.special.xlogy(probs, probs).sum(-1) + math.log(k)
    assert torch.all(kl_cat >= -1e-5) and torch.all(kl_cat <= math.log(k) + 1e-5)
    kl_gauss = out["kl"] - kl_cat
    torch.testing.assert_close(out["loss"], kl_gauss.mean().clamp(min=0.0), atol=1e-4, rtol=1e-4)
    gm.lamda = float(kl_gauss.mean().abs()) + 100.0
    assert float(gm(h)["loss"]) == pytest.approx(gm.lamda)  # floored at lamda


# --------------------------------------------------------------------------- NB decoder
def test_nb_head_formula_and_clamps():
    head = NBHead(16, 10, n_head_hidden=12)
    x = torch.randn(7, 16)
    with torch.no_grad():
        mean, theta = head(x)
        expected = torch.exp(head.dec_mean[0](torch.relu(head.dec_1(x))))
    torch.testing.assert_close(mean, expected.clamp(1e-5, 1e6), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(theta, head.dec_disp.exp().clamp(1e-4, 1e4))
    with torch.no_grad():
        head.dec_mean[0].bias[:3] = 200.0  # exp overflows
        head.dec_mean[0].bias[3:6] = -200.0
        head.dec_disp[:] = torch.tensor([100.0, -100.0, 0.0, 1.0, -1.0, 50, -50, 0, 0, 0])
        mean, theta = head(x)
    assert torch.isfinite(mean).all()
    assert mean.min() >= 1e-5 and mean.max() <= 1e6
    assert torch.all(mean[:, :3] == 1e6)
    torch.testing.assert_close(mean[:, 3:6], torch.full((7, 3), 1e-5))
    assert theta.min() >= 1e-4 and theta.max() <= 1e4
    assert float(theta[0]) == pytest.approx(1e4) and float(theta[1]) == pytest.approx(1e-4)
    assert float(theta[3]) == pytest.approx(math.e, rel=1e-6)


def _decoder():
    dec = NBDecoder(8, 16, 20, n_layers=2, dropout=0.3, covariates={"batch": 5, "dataset": 3})
    with torch.no_grad():
        for p in dec.covariate_layers.parameters():
            p.normal_()
    return dec.eval()


def test_nb_decoder_gene_index_equals_slicing():
    dec = _decoder()
    z = torch.randn(9, 8)
    cov = {"batch": torch.randint(0, 5, (9,))}
    idx = torch.tensor([7, 2, 2, 0, 19, 11])
    with torch.no_grad():
        mean, theta = dec(z, cov)
        mean_i, theta_i = dec(z, cov, gene_index=idx)
    assert mean.shape == (9, 20) and theta.shape == (20,)
    torch.testing.assert_close(mean_i, mean[:, idx], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(theta_i, theta[idx])


def test_nb_decoder_covariates_and_missing_covariate_path():
    dec = _decoder()
    z = torch.randn(9, 8)
    batch = torch.randint(0, 5, (9,))
    dataset = torch.randint(0, 3, (9,))
    layer = dec.layers[0]
    blocks = dec.covariate_layers[0]

    def block(name, e):
        emb, act, norm = blocks[name]
        return norm(act(e))

    with torch.no_grad():
        h = layer(z)
        expected_given = h + block("batch", blocks["batch"][0](batch))
        expected_given = expected_given + block("dataset", blocks["dataset"][0](dataset))
        expected_missing = h + block("batch", blocks["batch"][0](batch))
        expected_missing = expected_missing + block(
            "dataset", blocks["dataset"][0].weight.sum(0, keepdim=True)
        )
        got_given = dec(z, {"batch": batch, "dataset": dataset})
        got_missing = dec(z, {"batch": batch})
    torch.testing.assert_close(got_given[0], dec.out_layer(expected_given)[0])
    torch.testing.assert_close(got_missing[0], dec.out_layer(expected_missing)[0])
    assert not torch.allclose(got_missing[0], got_given[0])
    # the summed embedding acts as the mean embedding (GroupNorm is scale invariant)
    with torch.no_grad():
        as_mean = h + block("batch", blocks["batch"][0](batch))
        as_mean = as_mean + block("dataset", blocks["dataset"][0].weight.mean(0, keepdim=True))
    torch.testing.assert_close(got_missing[0], dec.out_layer(as_mean)[0], atol=1e-3, rtol=1e-3)
    # the missing covariate's table is detached (official behaviour)
    dec.train()
    dec.zero_grad()
    dec(z, {"batch": batch})[0].log().sum().backward()
    assert blocks["batch"][0].weight.grad.abs().sum() > 0
    grad = blocks["dataset"][0].weight.grad
    assert grad is None or torch.all(grad == 0)


def test_nb_decoder_without_covariates():
    dec = NBDecoder(8, 16, 20, covariates={"batch": 0}).eval()
    assert len(dec.covariate_layers) == 0
    z = torch.randn(5, 8)
    with torch.no_grad():
        mean, _ = dec(z, {"batch": torch.zeros(5, dtype=torch.long)})
        expected, _ = dec.out_layer(dec.layers[0](z))
    torch.testing.assert_close(mean, expected)


# --------------------------------------------------------------------------- NB loss
EPS = 1e-10


def _official_nb(x, m, theta):
    """Spec section 1.9, eps 1e-10."""
    t1 = torch.lgamma(theta + EPS) + torch.lgamma(x + 1.0) - torch.lgamma(x + theta + EPS)
    t2 = (theta + x) * torch.log(1.0 + m / (theta + EPS))
    return t1 + t2 + x * (torch.log(theta + EPS) - torch.log(m + EPS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nb_nll_matches_torch_and_official_formula(dtype):
    n, g = 40, 30
    x = torch.poisson(torch.rand(n, g) * 30).to(dtype)
    mean = torch.exp(torch.empty(n, g).uniform_(-3, 5)).to(dtype)  # ~0.05 .. 150
    theta = torch.exp(torch.empty(g).uniform_(-2, 4)).to(dtype).expand(n, g)  # ~0.14 .. 55
    got = nb_nll(x, mean, theta)
    reference = -torch.distributions.NegativeBinomial(
        total_count=theta, logits=mean.log() - theta.log(), validate_args=False
    ).log_prob(x)
    # torch's NB mean is total_count * exp(logits): the parameterisation above has mean `mean`
    dist = torch.distributions.NegativeBinomial(total_count=theta, logits=mean.log() - theta.log())
    torch.testing.assert_close(dist.mean, mean, rtol=1e-5, atol=1e-6)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(got, reference, **tol)
    torch.testing.assert_close(got, _official_nb(x, mean, theta), **tol)


def _official_loss_inputs(x, mean, theta, input_mask):
    x_dict = {
        "x_seq": x.to_sparse_coo(),
        "gene_mask": torch.arange(x.shape[1]),
        "input_mask": input_mask,
    }
    out_dict = {"mean": mean, "disp": theta.expand_as(mean)}
    return out_dict, x_dict


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_nb_loss_matches_official_dae(dtype):
    n, g = 12, 25
    x = _random_counts(n, g, density=0.5, empty_rows=[4]).to(dtype)
    mean = torch.exp(torch.randn(n, g)).to(dtype)
    theta = torch.exp(torch.randn(g)).to(dtype)
    input_mask = (torch.rand(n, g) < 0.25).long()
    input_mask[torch.arange(n), torch.randint(0, g, (n,))] = 1  # every cell is a masked cell
    input_mask[7] = 0
    input_mask[7, 3] = 1  # a cell with a single masked entry
    official = NBReconstructionLoss(dae=True).train()
    expected = official(*_official_loss_inputs(x, mean, theta, input_mask))
    got = masked_nb_loss(x, mean, theta, entries=input_mask.bool())
    assert got.shape == (n,)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-7, "atol": 1e-7}
    torch.testing.assert_close(got.mean(), expected, **tol)
    # without the DAE term: the official loss in eval mode
    official.eval()
    expected_plain = official(*_official_loss_inputs(x, mean, theta, input_mask))
    torch.testing.assert_close(masked_nb_loss(x, mean, theta).mean(), expected_plain, **tol)
    assert float(got.mean()) > float(expected_plain)  # the DAE term adds to the loss


def test_masked_nb_loss_on_masked_cells_subset_matches_official():
    """Official: rows of input_mask without a 1 are not in the loss; ours: pass those rows."""
    n, g = 10, 20
    x = _random_counts(n, g, density=0.5)
    mean = torch.exp(torch.randn(n, g))
    theta = torch.exp(torch.randn(g))
    cells = torch.tensor([0, 3, 4, 8])
    input_mask = torch.zeros(n, g, dtype=torch.long)
    input_mask[cells] = (torch.rand(len(cells), g) < 0.3).long()
    input_mask[cells, 0] = 1
    official = NBReconstructionLoss(dae=True).train()
    expected = official(*_official_loss_inputs(x, mean, theta, input_mask))
    got = masked_nb_loss(x[cells], mean[cells], theta, input_mask[cells].bool())
    torch.testing.assert_close(got.mean(), expected, rtol=1e-4, atol=1e-4)


def test_rescale_to_library():
    x = _random_counts(6, 10, density=0.6)
    x[2] = 0.0
    mean = torch.exp(torch.randn(6, 10))
    scaled = rescale_to_library(mean, x)
    torch.testing.assert_close(scaled.sum(1), x.sum(1))
    torch.testing.assert_close(
        scaled / scaled.sum(1, keepdim=True).clamp_min(1e-12),
        (mean / mean.sum(1, keepdim=True)) * (x.sum(1, keepdim=True) > 0),
    )
    w = (torch.rand(6, 10) < 0.5).float()
    w[:, 0] = 1.0
    scaled_w = rescale_to_library(mean, x, w)
    torch.testing.assert_close(scaled_w.sum(1), (x * w).sum(1))
    assert torch.all(scaled_w[w == 0] == 0)


# --------------------------------------------------------------------------- masking
@pytest.mark.parametrize(
    ("n_cells", "rate", "expected"),
    [(10, 0.75, 7), (100, 0.5, 50), (3, 0.1, 1), (1, 0.75, 1), (8, 0.25, 2), (7, 0.3, 2)],
)
def test_sample_mask_number_of_cells(n_cells, rate, expected):
    mask = sample_mask(n_cells, 13, rate, 0.25, torch.device("cpu"))
    assert isinstance(mask, TissueMask)
    assert len(mask.cells) == expected == max(1, math.floor(rate * n_cells))
    assert len(torch.unique(mask.cells)) == expected
    assert mask.cells.min() >= 0 and mask.cells.max() < n_cells
    assert mask.entries.shape == (expected, 13) and mask.entries.dtype == torch.bool


def test_sample_mask_is_random_over_cells():
    draws = {
        tuple(sample_mask(20, 5, 0.25, 0.5, torch.device("cpu")).cells.tolist()) for _ in range(5)
    }
    assert len(draws) > 1
    counts = torch.zeros(20)
    for _ in range(400):
        counts[sample_mask(20, 5, 0.25, 0.5, torch.device("cpu")).cells] += 1
    assert torch.all(counts > 0)  # every cell gets masked at some point (expected 100 each)


@pytest.mark.parametrize("gene_rate", [0.25, 0.6])
def test_sample_mask_entry_fraction(gene_rate):
    torch.manual_seed(123)
    n, g = 2000, 500
    mask = sample_mask(n, g, 1.0, gene_rate, torch.device("cpu"))
    frac = mask.entries.float().mean().item()
    sd = math.sqrt(gene_rate * (1 - gene_rate) / (n * g))
    assert abs(frac - gene_rate) < 6 * sd
    per_gene = mask.entries.float().mean(0)  # no gene is systematically spared
    assert per_gene.min() > gene_rate - 0.06 and per_gene.max() < gene_rate + 0.06


@pytest.fixture
def masked_tissue():
    n, g = 30, 25
    x = _random_counts(n, g, density=0.4, empty_rows=[2, 11])
    others = torch.randperm(n)
    others = others[others != 2]
    cells = torch.cat([others[:7], torch.tensor([2]), others[7:14]])  # unordered, an empty row
    return x, TissueMask(cells, torch.rand(len(cells), g) < 0.4)


def _expected_masked(x, mask):
    expected = x.clone()
    for row, cell in enumerate(mask.cells.tolist()):
        expected[cell, mask.entries[row]] = 0.0
    return expected


def test_apply_mask_dense(masked_tissue):
    x, mask = masked_tissue
    x_before = x.clone()
    out = apply_mask(x, mask)
    assert torch.equal(x, x_before)  # not modified in place
    assert out.data_ptr() != x.data_ptr()
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, _expected_masked(x, mask))
    kept = torch.ones(x.shape[0], dtype=torch.bool)
    kept[mask.cells] = False
    assert torch.equal(out[kept], x[kept])
    assert torch.all(out[mask.cells][mask.entries] == 0)
    assert torch.equal(out[mask.cells][~mask.entries], x[mask.cells][~mask.entries])
    assert (x[mask.cells][mask.entries] > 0).any()  # the test does hide some non-zeros


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_apply_mask_csr_equals_dense(masked_tissue, index_dtype):
    x, mask = masked_tissue
    csr = _csr(x, index_dtype)
    crow, col, values = csr.crow_indices().clone(), csr.col_indices().clone(), csr.values().clone()
    out = apply_mask(csr, mask)
    # input untouched
    assert torch.equal(csr.values(), values)
    assert torch.equal(csr.crow_indices(), crow) and torch.equal(csr.col_indices(), col)
    # same sparsity structure, masked stored values set to 0
    assert out.layout == torch.sparse_csr and out.shape == x.shape
    assert out.crow_indices().dtype == out.col_indices().dtype == index_dtype
    assert torch.equal(out.crow_indices(), crow) and torch.equal(out.col_indices(), col)
    assert out.values().shape == values.shape
    assert (out.values() == 0).sum() > 0 and torch.all(
        (out.values() == 0) | (out.values() == values)
    )
    assert torch.equal(out.to_dense(), apply_mask(x, mask))
    assert torch.equal(out.to_dense(), _expected_masked(x, mask))


def test_apply_mask_leaves_unmasked_cells_when_all_entries_hidden():
    x = _random_counts(6, 8, density=0.9)
    mask = TissueMask(torch.tensor([4, 1]), torch.ones(2, 8, dtype=torch.bool))
    for inp in (x, x.to_sparse_csr()):
        out = apply_mask(inp, mask)
        out = out.to_dense() if out.layout == torch.sparse_csr else out
        assert torch.all(out[[1, 4]] == 0)
        assert torch.equal(out[[0, 2, 3, 5]], x[[0, 2, 3, 5]])


def test_nb_head_under_float16_autocast():
    """float16 cannot hold exp(logits) beyond ~11 (nor the 1e6 clamp): the head's exp runs in
    float32, so 16-mixed training and fp16 inference get finite means."""
    from cellplm_scvi.nn._decoder import NBHead

    torch.manual_seed(0)
    head = NBHead(16, 50)
    with torch.no_grad():
        head.dec_mean[0].bias.fill_(12.0)  # exp(12) > 65504
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.float16):
        mean, _ = head(x)
    assert mean.dtype == torch.float32 and torch.isfinite(mean).all()
    torch.testing.assert_close(mean, head(x)[0].detach(), rtol=1e-2, atol=0.0)
