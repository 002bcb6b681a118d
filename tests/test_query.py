"""Query mapping with ``CellPLM.load_query_data``: what is trainable, what stays frozen (the
reference rows of the decoder's batch table, the reference model itself), the query's history.
"""

from __future__ import annotations

import numpy as np
import pytest
import scvi
import torch

from cellplm_scvi import CellPLM
from tests._anndata_checks import unregistered
from tests._helpers import (
    ARCH,
    FIT,
    history_values,
)

QUERY_SAMPLE = "slide1_R"  # the query batch of the query-mapping tests


@pytest.fixture(scope="module")
def reference(fov_slides):
    """Reference of three samples (``batch_key="sample"``); the query is a fourth sample."""
    ref = fov_slides[fov_slides.obs["sample"] != QUERY_SAMPLE].copy()
    query = fov_slides[fov_slides.obs["sample"] == QUERY_SAMPLE].copy()
    for part in (ref, query):
        part.obs["sample"] = part.obs["sample"].astype(str)
    CellPLM.setup_anndata(ref, batch_key="sample", tissue_key="fov")
    scvi.settings.seed = 0
    model = CellPLM(ref, **ARCH)
    model.train(max_epochs=1, **FIT)
    assert model.summary_stats.n_batch == 3
    return model, ref, query


def _covariate_tables(module) -> set[str]:
    return {
        name
        for name, _ in module.named_parameters()
        if name.startswith("decoder.covariate_layers.") and name.endswith(".batch.0.weight")
    }


def _trainable(module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def test_query_trainable_parameters(reference):
    ref_model, _, query = reference
    model = CellPLM.load_query_data(query.copy(), ref_model)
    tables = _covariate_tables(model.module)
    assert tables, "the reference decoder has no batch-embedding table"
    assert _trainable(model.module) == tables
    for name in tables:  # one new row for the query sample
        assert model.module.get_parameter(name).shape[0] == 4

    model = CellPLM.load_query_data(query.copy(), ref_model, train_decoder=True)
    decoder = {n for n, _ in model.module.named_parameters() if n.startswith("decoder.")}
    assert _trainable(model.module) == decoder
    # the reference model itself is left trainable and unchanged
    assert all(
        p.requires_grad for n, p in ref_model.module.named_parameters() if "pe_enc" not in n
    )


@pytest.mark.parametrize("train_decoder", [False, True])
def test_query_training_keeps_the_reference(reference, train_decoder):
    ref_model, ref, query = reference
    z_ref = ref_model.get_latent_representation()
    ref_state = {k: v.clone() for k, v in ref_model.module.state_dict().items()}

    # zero-shot: the reference cannot embed the new sample; relabelled to a reference sample,
    # it can, and the embedding does not depend on the batch
    zero_shot = query.copy()
    zero_shot.obs["sample"] = ref.obs["sample"].iloc[0]
    z_zero_shot = ref_model.get_latent_representation(zero_shot)

    model = CellPLM.load_query_data(query.copy(), ref_model, train_decoder=train_decoder)
    np.testing.assert_allclose(model.get_latent_representation(), z_zero_shot, atol=1e-6)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    scvi.settings.seed = 0
    model.train(max_epochs=2, **FIT)
    after = model.module.state_dict()

    # the VAE latent counts its training steps (buffer kl_step_count) even when frozen
    counters = {k for k in after if k.endswith(".kl_step_count")}
    changed = {k for k in after if not torch.equal(after[k], before[k])} - counters
    tables = _covariate_tables(model.module)
    assert tables <= changed, "the new batch rows were not gmvae_model"
    if not train_decoder:
        assert changed == tables
    else:
        assert all(k.startswith("decoder.") for k in changed), changed
    for name in tables:
        np.testing.assert_array_equal(after[name][:3].numpy(), before[name][:3].numpy())
        assert not torch.equal(after[name][3], before[name][3])

    # embeddings: reference cells exactly as before, query cells as zero-shot
    np.testing.assert_array_equal(model.get_latent_representation(unregistered(ref)), z_ref)
    np.testing.assert_allclose(model.get_latent_representation(), z_zero_shot, atol=1e-6)
    # the reference model is untouched
    for key, value in ref_model.module.state_dict().items():
        assert torch.equal(value, ref_state[key]), key
    np.testing.assert_array_equal(ref_model.get_latent_representation(), z_ref)


def test_query_training_records_history(reference):
    ref_model, _, query = reference
    model = CellPLM.load_query_data(query.copy(), ref_model)
    n_reference = len(history_values(ref_model, "train_loss"))
    model.train(max_epochs=2, **FIT)
    loss = history_values(model, "train_loss")
    assert len(loss) == n_reference + 2  # the query's own epochs are appended
    assert np.isfinite(loss).all()


def test_query_reference_rows_frozen_under_weight_decay(reference):
    ref_model, _, query = reference
    model = CellPLM.load_query_data(query.copy(), ref_model)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    model.train(max_epochs=1, lr=1e-2, plan_kwargs={"weight_decay": 0.5}, **FIT)
    for name in _covariate_tables(model.module):
        after = model.module.get_parameter(name).detach()
        np.testing.assert_array_equal(after[:3].numpy(), before[name][:3].numpy())


def test_query_on_single_batch_reference(reference):
    _, ref, query = reference
    single = unregistered(ref[ref.obs["sample"] == ref.obs["sample"].iloc[0]])
    CellPLM.setup_anndata(single, batch_key="sample", tissue_key="fov")
    scvi.settings.seed = 0
    ref_model = CellPLM(single, **ARCH)
    with pytest.raises(ValueError, match="no decoder batch table.*get_latent_representation"):
        CellPLM.load_query_data(query.copy(), ref_model)


def test_query_reference_model_type(reference, fov_slides):
    _, _, query = reference
    adata = fov_slides.copy()
    scvi.model.SCVI.setup_anndata(adata)
    other = scvi.model.SCVI(adata, n_hidden=8, n_latent=2, n_layers=1)
    for wrong in (other, CellPLM, "model.pt"):
        with pytest.raises(ValueError, match="reference_model must be a CellPLM"):
            CellPLM.load_query_data(query.copy(), wrong)
