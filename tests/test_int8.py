"""int8 CPU inference (``precision="int8"``): the kernel, the cache, accuracy against float32.

Accuracy is measured on a random-weight checkpoint of the official 85M architecture (official
file format) and on a small model trained on real PBMC counts (``pbmc68k_counts``).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import pytest
import scipy.sparse as sp
import scvi
import torch
from anndata import AnnData
from sklearn.neighbors import NearestNeighbors
from torch import nn

import cellplm_scvi as cp
from cellplm_scvi.nn import _int8
from cellplm_scvi.nn._flowformer import FlowformerEncoder
from cellplm_scvi.nn._int8 import (
    Int8Linear,
    encode_refining_ties,
    int8_copy,
    int8_unsupported,
    recording_flow_sums,
)
from cellplm_scvi.nn._segments import TissueSegments
from tests._helpers import FIT


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _knn_edges(z: np.ndarray, k: int = 15) -> set[tuple[int, int]]:
    idx = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z, return_distance=False)
    return {(i, j) for i, row in enumerate(idx[:, 1:]) for j in row}


# ------------------------------------------------------------------------------ the kernel
def test_int8_kernel_is_present_and_faster_than_float32():
    """Capability check of torch's fbgemm/x86 ``quantized::linear_dynamic``: present in this
    build, and a 1024 x 1024 layer on 2,000 rows beats the float32 GEMM (measured ~0.6x of its
    time on the project's CPU; the test allows up to 1x). If this fails, torch dropped or
    slowed the kernel: ``precision="int8"`` would be a slow-down; see ``nn/_int8.py``."""
    assert int8_unsupported("cpu") is None, int8_unsupported("cpu")
    torch.manual_seed(0)
    linear = nn.Linear(1024, 1024)
    quantized = Int8Linear(linear)
    x = torch.randn(2000, 1024)
    times = {"fp32": [], "int8": []}
    with torch.inference_mode():
        for _ in range(7):  # alternating, min of each: robust to a shared machine
            for name, layer in (("fp32", linear), ("int8", quantized)):
                t0 = time.perf_counter()
                layer(x)
                times[name].append(time.perf_counter() - t0)
    fp32, int8 = min(times["fp32"]), min(times["int8"])
    assert int8 < fp32, f"quantized::linear_dynamic {int8:.4f}s vs float32 {fp32:.4f}s"


def test_int8_linear_matches_float_and_keeps_its_weights():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    before = {k: v.clone() for k, v in linear.state_dict().items()}
    quantized = Int8Linear(linear)
    x = torch.randn(3, 50, 64)  # any leading shape
    with torch.inference_mode():
        ref, out = linear(x), quantized(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    relative = (out - ref).norm() / ref.norm()
    assert 1e-5 < relative < 2e-2  # quantized (not a float copy), and close
    for k, v in linear.state_dict().items():
        assert torch.equal(v, before[k])


def test_int8_copy_replaces_linears_and_shares_the_rest():
    torch.manual_seed(0)
    block = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 8))
    clone = int8_copy(block, keep=lambda name: name == "3")
    assert isinstance(clone[1], Int8Linear) and isinstance(clone[3], nn.Linear)
    assert isinstance(block[1], nn.Linear)  # the original is untouched
    assert clone[0].weight is block[0].weight and clone[3].weight is block[3].weight
    assert block[1].weight.requires_grad


def test_int8_attention_runs_one_fused_projection_with_the_same_numbers():
    """The int8 copy of a flow attention quantizes its input once for queries, keys and
    values (one d -> 3d product, ``fused_qkv``): the same numbers as three int8 layers."""
    torch.manual_seed(0)
    encoder = FlowformerEncoder(64, 2, 4, 0.0).eval()
    quantized = int8_copy(encoder)
    attention, original = quantized.layers[0].self_attn, encoder.layers[0].self_attn
    assert isinstance(attention.fused_qkv, Int8Linear) and attention.fused_qkv.out_features == 192
    assert attention.query_projection is None and not hasattr(original, "fused_qkv")
    assert isinstance(original.query_projection, nn.Linear)  # the float module is untouched
    x = torch.randn(40, 64)
    names = ("query_projection", "key_projection", "value_projection")
    with torch.inference_mode():
        fused = attention.fused_qkv(x)
        apart = torch.cat([Int8Linear(getattr(original, n))(x) for n in names], -1)
        assert torch.equal(fused, apart)
        kept = int8_copy(encoder, keep=lambda name: name.endswith("key_projection"))
        assert kept.layers[0].self_attn.fused_qkv is None  # one kept in float32: no fusion
        assert isinstance(kept.layers[0].self_attn.key_projection, nn.Linear)
        torch.testing.assert_close(quantized(x), encoder(x), rtol=0, atol=0.05)
    with pytest.raises(ValueError, match="one input width"):
        Int8Linear(nn.Linear(8, 4), nn.Linear(16, 4))


def test_int8_weights_use_seven_bits_for_full_range_activations():
    """Weights in [-63, 63] so that 8-bit activations (reduce_range off) cannot overflow the
    AVX2 kernel's int16 pair sums. Worst case: +-1 weights and 0/1 inputs, all exactly on
    the int8 grids, so the product must be exact (8-bit weights would saturate here)."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 64, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randint(0, 2, (64, 256)).float() * 2 - 1)
    quantized = Int8Linear(linear)
    weight, _ = torch.ops.quantized.linear_unpack(quantized._packed)
    assert int(weight.int_repr().abs().max()) == 63
    x = torch.randint(0, 2, (500, 256)).float()
    with torch.inference_mode():
        ref, out = linear(x), quantized(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-3)


def test_quantizing_shows_no_deprecation_warning():
    """torch 2.13 deprecates quantized tensors; the warning is silenced where weights are
    quantized (a fresh process: torch raises it once per process)."""
    code = (
        "import torch; from cellplm_scvi.nn._int8 import Int8Linear; "
        "Int8Linear(torch.nn.Linear(8, 8))(torch.randn(2, 8))"
    )
    run = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]


# ------------------------------------------------------------- GMVAE near-tie refinement
@pytest.mark.parametrize("local", [False, True])
def test_rows_rerun_from_the_tissue_sums_match_the_full_pass(local):
    """The refinement's float32 re-run of some rows, reading the rest of the tissue through
    the attention sums recorded in a pass over the whole tissue, is that pass's output for
    those rows (float32 sums: to float rounding); also with local (spatial kernel) heads."""
    torch.manual_seed(0)
    encoder = FlowformerEncoder(32, 2, 4, 0.0, n_local_heads=2 if local else 0).eval()
    x = torch.randn(50, 32)
    spatial = torch.rand(50, 9) if local else None
    rows = torch.tensor([3, 17, 40])
    recording = int8_copy(encoder, keep=lambda name: True)  # float32 layers, recording
    with torch.inference_mode():
        reference = encoder(x, None, spatial)
        with recording_flow_sums(recording) as sums:
            recorded = recording(x, None, spatial)
        again = encoder.forward_rows(x[rows], sums, None if spatial is None else spatial[rows])
    assert torch.equal(recorded, reference)  # recording changes no number
    assert [len(layer) for layer in sums] == [2 if local else 1] * 2
    torch.testing.assert_close(again, reference[rows], rtol=1e-5, atol=1e-5)
    assert recording.layers[0].self_attn.recorded_sums is None  # recording is over
    assert not hasattr(encoder.layers[0].self_attn, "recorded_sums")  # float: no recording
    with pytest.raises(TypeError, match="int8_copy"), recording_flow_sums(encoder):
        pass


def test_refinement_recomputes_the_near_tied_rows_only():
    """Rows whose int8 top-2 logit margin is below ``margin`` get (nearly) their float32 state;
    the others keep the int8 one. Packed tissues: the tissues with such a row run again alone
    in float32 (exact)."""
    torch.manual_seed(0)
    encoder = FlowformerEncoder(64, 2, 4, 0.0).eval()
    quantized = int8_copy(encoder)
    head = nn.Linear(64, 4)
    x = torch.randn(60, 64)
    with torch.inference_mode():
        fp32, int8 = encoder(x), quantized(x)
        top2 = head(int8).topk(2, -1).values
        margins = top2[:, 0] - top2[:, 1]
        margin = float(margins.median())  # half the rows are "near-ties"
        tied = margins < margin
        h = encode_refining_ties(quantized, encoder, nn.Identity(), head, x, margin=margin)
        torch.testing.assert_close(h[tied], fp32[tied], rtol=0, atol=2e-3)  # int8 sums
        assert (h[tied] - fp32[tied]).abs().max() < 0.2 * (int8[tied] - fp32[tied]).abs().max()
        assert torch.equal(h[~tied], int8[~tied])
        # packed: two tissues; every tissue with a near-tie comes out exactly float32
        index = (torch.arange(60) >= 30).long()
        tissues = TissueSegments.from_index(index)
        packed_int8 = quantized(x, tissues)
        top2 = head(packed_int8).topk(2, -1).values
        tied = top2[:, 0] - top2[:, 1] < margin
        h = encode_refining_ties(quantized, encoder, nn.Identity(), head, x, tissues, None, margin)
        for t in (0, 1):
            rows = index == t
            assert tied[rows].any()
            torch.testing.assert_close(h[rows], encoder(x[rows]), rtol=0, atol=1e-6)
        no_refinement = encode_refining_ties(quantized, encoder, nn.Identity(), head, x, margin=0)
        assert torch.equal(no_refinement, int8)
        # a margin below the int8 error widens to 1.25x the margin shift of the refined rows
        margins = (lambda t: t[:, 0] - t[:, 1])(head(int8).topk(2, -1).values)
        tiny = float(margins.min()) + 1e-7  # only the closest tie at first
        error = head(int8) - head(fp32)
        h = encode_refining_ties(quantized, encoder, nn.Identity(), head, x, margin=tiny)
        changed = (h != int8).any(1)
        assert changed.sum() > 1
        assert (margins[changed] < 1.25 * (error.amax(1) - error.amin(1)).max() + 1e-3).all()


# ------------------------------------------------------------------------------ the model
def _train(latent: str) -> cp.CellPLM:
    """A labelled model trained briefly on the 700 real PBMCs (4 tissues of <= 175 cells)."""
    adata = cp.datasets.pbmc68k_counts()
    cp.CellPLM.setup_anndata(adata, labels_key="cell_type", max_cells=175)
    scvi.settings.seed = 0
    model = cp.CellPLM(adata, n_hidden=128, n_layers=2, n_heads=8, n_latent=16, latent=latent)
    model.train(max_epochs=30, lr=1e-3, **FIT)
    return model


@pytest.fixture(scope="module")
def trained() -> cp.CellPLM:
    return _train("vae")


def _both_precisions(model: cp.CellPLM, adata: AnnData) -> dict[str, dict[str, np.ndarray]]:
    """The module's ``qz_m``, encoder state ``h`` and, for a GMVAE, ``y_probs`` of every tissue
    (emission order), in float32 and in int8."""
    out = {"32": {}, "int8": {}}
    for precision, context in (("32", nullcontext), ("int8", model.module.int8_inference)):
        parts = []
        with torch.inference_mode(), context():
            for tensors in model._make_data_loader(adata):
                parts.append(model.module.inference(**model.module._get_inference_input(tensors)))
        for key in ("qz_m", "y_probs", "h"):
            if key in parts[0]:
                out[precision][key] = torch.cat([p[key] for p in parts]).numpy()
    return out


def _cluster_flips(out: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cosine per cell, cluster kept per cell, float32 top-2 logit margin per cell)."""
    log32 = np.log(out["32"]["y_probs"])
    same = log32.argmax(1) == out["int8"]["y_probs"].argmax(1)
    top2 = np.sort(log32, 1)[:, -2:]
    return _cosine(out["32"]["qz_m"], out["int8"]["qz_m"]), same, top2[:, 1] - top2[:, 0]


def test_int8_matches_float32_on_a_trained_model(trained):
    """VAE latent (continuous in the encoder's output): every cell within cosine 0.999."""
    adata = trained.adata
    fp32 = trained.get_latent_representation()
    int8 = trained.get_latent_representation(precision="int8")
    cosine = _cosine(fp32, int8)
    print(f"trained pbmc68k VAE model: min per-cell cosine int8 vs fp32 {cosine.min():.6f}")
    assert cosine.min() >= 0.999
    assert not np.array_equal(fp32, int8)  # the int8 path did run
    edges, edges_int8 = _knn_edges(fp32), _knn_edges(int8)
    kept = len(edges & edges_int8) / len(edges)
    print(f"15-NN edges kept {kept:.4f}")
    assert kept >= 0.95
    labels, labels_int8 = trained.predict(), trained.predict(precision="int8")
    agree = (labels == labels_int8).mean()
    print(f"predict agreement {agree:.4f}")
    assert agree >= 0.99
    assert (labels_int8 == adata.obs["cell_type"].to_numpy()).mean() > 0.5  # it learned


def test_int8_on_a_trained_gmvae_model(monkeypatch):
    """GMVAE latent ``E[z | h, argmax_y q(y|h)]``: the cells whose two best clusters nearly tie
    are recomputed in float32 (``nn/_int8.py``), so every cell is within cosine 0.999."""
    model = _train("gmvae")
    cosine, same, margin = _cluster_flips(_both_precisions(model, model.adata))
    print(
        f"trained pbmc68k GMVAE model: min per-cell cosine {cosine.min():.6f}; "
        f"{(~same).sum()} of {len(same)} cells change cluster; "
        f"{(margin < _int8.INT8_TIE_MARGIN).sum()} with a float32 margin below the tie margin"
    )
    assert cosine.min() >= 0.999
    edges = _knn_edges(model.get_latent_representation())
    kept = len(edges & _knn_edges(model.get_latent_representation(precision="int8")))
    assert kept / len(edges) >= 0.95
    agree = (model.predict() == model.predict(precision="int8")).mean()
    print(f"15-NN edges kept {kept / len(edges):.4f}, predict agreement {agree:.4f}")
    assert agree >= 0.99


def test_int8_refinement_on_a_spatial_gmvae_with_local_heads(monkeypatch):
    """End to end through the model: with every row below the tie margin, the cell latent
    (local kernel heads: rows re-run from the int8 pass's sums) is closer to float32. A cell
    may still switch cluster after its refinement only at a float32 near-tie (the sums keep
    their int8 error, ~1e-3)."""
    adata = cp.datasets.simulate_tissue(n_cells=300, n_slides=2, seed=0)
    kwargs = {"layer": "counts", "spatial_key": "spatial", "library_key": "slide"}
    cp.CellPLM.setup_anndata(adata, max_cells=100, **kwargs)
    scvi.settings.seed = 0
    model = cp.CellPLM(
        adata, n_hidden=64, n_layers=2, n_heads=4, n_latent=8, latent="gmvae", n_local_heads=2
    )
    model.train(max_epochs=1, train_size=1.0, **FIT)
    monkeypatch.setattr(_int8, "INT8_TIE_MARGIN", 0.0)
    unrefined = _both_precisions(model, adata)
    monkeypatch.setattr(_int8, "INT8_TIE_MARGIN", 100.0)  # every row
    out = _both_precisions(model, adata)
    _, same, margin = _cluster_flips(out)
    _, same_unrefined, _ = _cluster_flips(unrefined)
    error = np.abs(out["int8"]["h"] - out["32"]["h"]).max()
    int8_error = np.abs(unrefined["int8"]["h"] - out["32"]["h"]).max()
    print(
        f"cell: encoder state of all rows refined {error:.2e}, int8 {int8_error:.2e}; cluster "
        f"switches {(~same).sum()} (unrefined {(~same_unrefined).sum()}), at float32 margins "
        f"{margin[~same]}"
    )
    assert error < 0.5 * int8_error
    assert (margin[~same] < 0.005).all()


def test_int8_cache_lifecycle_and_float_weights(trained, tmp_path):
    module = trained.module
    state = {k: v.clone() for k, v in module.state_dict().items()}
    first = trained.get_latent_representation(precision="int8")
    cached = module._int8_cache[1]["encoder"]
    assert any(isinstance(m, Int8Linear) for m in cached.modules())
    assert all(not isinstance(m, Int8Linear) for m in module.modules())
    # quantized once: the next call (and an eval() switch) reuse the copy
    module.eval()
    again = trained.get_latent_representation(precision="int8")
    assert module._int8_cache[1]["encoder"] is cached
    np.testing.assert_array_equal(first, again)
    # the float weights, state dict and saved files are the originals
    after = module.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state)
    trained.save(tmp_path / "model", save_anndata=False)
    saved = torch.load(tmp_path / "model" / "model.pt", weights_only=False)["model_state_dict"]
    assert saved.keys() == state.keys()
    assert copy.deepcopy(module).__dict__.get("_int8_cache") is None  # copies leave it out
    # whatever may change the weights drops the copy
    for drop in (
        lambda: module.train(),
        lambda: module.load_state_dict(state),
        lambda: module.to("cpu"),
        lambda: module.float(),
    ):
        trained.get_latent_representation(precision="int8")
        assert module.__dict__.get("_int8_cache") is not None
        drop()
        assert module.__dict__.get("_int8_cache") is None
    # an in-place edit of a float weight (no call above) is seen by the next int8 call
    trained.get_latent_representation(precision="int8")
    weight = module.encoder.layers[0]._ff_block[0].weight
    with torch.no_grad():
        weight.mul_(2.0)
    try:
        edited = trained.get_latent_representation(precision="int8")
        assert module._int8_cache[1]["encoder"] is not cached
        assert not np.allclose(edited, first, atol=1e-3)
        assert np.median(_cosine(edited, trained.get_latent_representation())) > 0.999
    finally:
        with torch.no_grad():
            weight.div_(2.0)


def test_int8_refuses_other_devices_and_builds(trained, monkeypatch):
    with pytest.raises(ValueError, match="precision must be one of.*int8"):
        trained.get_latent_representation(precision="int4")
    assert "CPU only" in int8_unsupported("cuda")
    monkeypatch.setattr(_int8, "INT8_ENGINES", ("no-such-engine",))
    with pytest.raises(ValueError, match="fbgemm/x86 quantized engine"):
        trained.get_latent_representation(precision="int8")
    with pytest.raises(ValueError, match="fbgemm/x86 quantized engine"):
        trained.predict(precision="int8")


def test_int8_refuses_a_model_off_the_cpu():
    adata = cp.datasets.pbmc68k_counts()[:40].copy()
    cp.CellPLM.setup_anndata(adata)
    model = cp.CellPLM(adata, n_hidden=16, n_layers=1, n_heads=2, n_latent=4)
    model.module.to("meta")  # a device that is not the CPU (no GPU needed)
    with pytest.raises(ValueError, match="CPU only"):
        with model.module.int8_inference():
            pass


# ------------------------------------------------------------------------------ 85M weights
@pytest.mark.slow
@pytest.mark.parametrize("latent", ["vae", "gmvae"])
def test_int8_on_the_85m_architecture(latent, tmp_path, monkeypatch):
    """Random weights of the official 85M architecture (1024 wide, 4 layers, 512-d latent):
    every cell within cosine 0.999 of float32.

    GMVAE (like ``20230926_85M``): the latent is ``E[z | h, argmax_y q(y|h)]``; random weights
    leave many near-ties of the cluster logits, which the float32 refinement of
    ``nn/_int8.py`` settles. Without it (margin 0) some cells switch cluster, which costs them
    about 1e-3 of cosine (0.9986-0.9990): the refinement is what passes this test."""
    prefix = tmp_path / f"random_85M_{latent}"
    cp.datasets.random_official_checkpoint(
        prefix, latent=latent, n_hidden=1024, n_layers=4, n_latent=512, seed=0
    )
    vocab = json.loads(prefix.with_suffix(".config.json").read_text())["gene_list"]
    rng = np.random.default_rng(0)
    x = sp.random(300, len(vocab), density=0.1, format="csr", random_state=rng, dtype=np.float32)
    x.data = rng.poisson(2.0, x.nnz).astype(np.float32) + 1
    adata = AnnData(x)
    adata.var_names = vocab
    adata.obs["tissue"] = "all"
    cp.CellPLM.setup_anndata(adata, tissue_key="tissue")
    model = cp.CellPLM.load_official(prefix, adata)
    fp32 = model.get_latent_representation()
    cosine = _cosine(fp32, model.get_latent_representation(precision="int8"))
    print(f"85M {latent}: min per-cell cosine {cosine.min():.6f}, mean {cosine.mean():.6f}")
    assert cosine.min() >= 0.999
    if latent == "gmvae":
        monkeypatch.setattr(_int8, "INT8_TIE_MARGIN", 0.0)  # no refinement
        unrefined = _cosine(fp32, model.get_latent_representation(precision="int8"))
        print(f"85M gmvae without the refinement: min per-cell cosine {unrefined.min():.6f}")
        assert unrefined.min() < 0.9995  # a cell switched cluster (~1e-3 of cosine; else ~3e-5)
