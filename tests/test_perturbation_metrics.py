"""Perturbation metrics and baselines (``cellplm_scvi.metrics``) on small hand-built screens
whose answers are known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from cellplm_scvi.metrics import (
    condition_means,
    evaluate_perturbation,
    perturbation_baselines,
    summarize_perturbation,
)
from cellplm_scvi.metrics._perturbation import perturbed_genes

GENES = ["A", "B", "C", "g3", "g4", "g5", "g6", "g7"]
# condition -> (split, number of cells); "Z" is not a gene of the data
CONDITIONS = {
    "ctrl": ("train", 6),
    "A+ctrl": ("train", 3),
    "B+ctrl": ("train", 5),
    "g3+ctrl": ("train", 4),
    "A+g3": ("train", 3),
    "C+ctrl": ("test", 4),
    "A+B": ("test", 3),
    "B+C": ("test", 2),
    "Z+ctrl": ("test", 2),
}
TEST = ["C+ctrl", "A+B", "B+C", "Z+ctrl"]


def lognorm_mean(x: np.ndarray) -> np.ndarray:
    """Mean over rows of log1p(CP10k), written out independently of the package."""
    x = np.asarray(x, dtype=np.float64)
    return np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4).mean(axis=0)


@pytest.fixture(scope="module")
def screen() -> AnnData:
    rng = np.random.default_rng(0)
    blocks, labels, splits = [], [], []
    for name, (split, n) in CONDITIONS.items():
        base = rng.uniform(1, 20, size=len(GENES))  # each condition has its own profile
        blocks.append(rng.poisson(base, size=(n, len(GENES))) + 1)
        labels += [name] * n
        splits += [split] * n
    x = np.vstack(blocks).astype(np.float32)
    obs = pd.DataFrame(
        {"condition": pd.Categorical(labels), "split": splits},
        index=[f"c{i}" for i in range(len(labels))],
    )
    adata = AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=GENES))
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(x))  # X is not counts: the layer must be used
    return adata


@pytest.fixture(scope="module")
def truth(screen) -> pd.DataFrame:
    x = screen.layers["counts"].toarray()
    labels = screen.obs["condition"].astype(str).to_numpy()
    return pd.DataFrame({c: lognorm_mean(x[labels == c]) for c in CONDITIONS}, index=GENES).T


def test_condition_means(screen, truth):
    means = condition_means(screen, layer="counts", conditions=["B+C", "ctrl"])
    assert list(means.obs_names) == ["B+C", "ctrl"] and list(means.var_names) == GENES
    np.testing.assert_allclose(means.X, truth.loc[["B+C", "ctrl"]].to_numpy(), rtol=1e-6)
    every = condition_means(screen, layer="counts")
    assert list(every.obs_names) == list(CONDITIONS)  # order of appearance


def test_baselines_have_their_formulas(screen, truth):
    predictions = perturbation_baselines(screen, layer="counts")
    assert set(predictions) == {"no-change", "train-mean", "additive", "linear"}
    control = truth.loc["ctrl"].to_numpy()
    for prediction in predictions.values():
        assert list(prediction.obs_names) == TEST and list(prediction.var_names) == GENES
    np.testing.assert_allclose(predictions["no-change"].X, np.tile(control, (4, 1)), rtol=1e-6)
    # each training perturbation counts once, whatever its number of cells; ctrl is not one
    train_mean = truth.loc[["A+ctrl", "B+ctrl", "g3+ctrl", "A+g3"]].mean().to_numpy()
    np.testing.assert_allclose(predictions["train-mean"].X, np.tile(train_mean, (4, 1)), rtol=1e-6)
    additive = predictions["additive"].to_df()
    expected = truth.loc["A+ctrl"] + truth.loc["B+ctrl"] - truth.loc["ctrl"]
    np.testing.assert_allclose(additive.loc["A+B"], expected, rtol=1e-5)
    # C and Z have no training single
    assert additive.loc[["C+ctrl", "B+C", "Z+ctrl"]].isna().all(axis=None)


def test_linear_baseline(screen, truth):
    """Doubles are additive in the embedding, so in the linear model's change; a gene that is
    not in the data adds nothing (the prediction is the training mean)."""
    conditions = ["A+ctrl", "B+ctrl", "A+B", "Z+ctrl", "g3+ctrl"]
    linear = perturbation_baselines(screen, layer="counts", conditions=conditions)["linear"]
    linear = linear.to_df()
    assert list(linear.index) == conditions and np.isfinite(linear.to_numpy()).all()
    offset = truth.loc[["A+ctrl", "B+ctrl", "g3+ctrl", "A+g3"]].mean()
    np.testing.assert_allclose(linear.loc["Z+ctrl"], offset, rtol=1e-5)
    np.testing.assert_allclose(
        linear.loc["A+B"] - offset,
        (linear.loc["A+ctrl"] - offset) + (linear.loc["B+ctrl"] - offset),
        atol=1e-5,
    )
    # it has learnt something: closer to the training singles than their mean is
    fit = ((linear.loc[["A+ctrl", "g3+ctrl"]] - truth.loc[["A+ctrl", "g3+ctrl"]]) ** 2).sum()
    assert fit.sum() < ((truth.loc[["A+ctrl", "g3+ctrl"]] - offset) ** 2).sum().sum()


def test_perfect_prediction_and_no_change(screen, truth):
    perfect = condition_means(screen, layer="counts", conditions=TEST)
    table = evaluate_perturbation(screen, {"perfect": perfect}, layer="counts", n_top_genes=3)
    assert table.attrs["n_top_genes"] == 3
    ours = table[table["method"] == "perfect"].set_index("condition")
    assert list(ours.index) == TEST
    np.testing.assert_allclose(ours[["pearson_delta", "pearson_delta_top"]], 1.0, rtol=1e-6)
    np.testing.assert_allclose(ours[["mse", "mse_top"]], 0.0, atol=1e-10)
    assert list(ours["condition_type"]) == [
        "single_unseen",
        "double_unseen",
        "double_unseen_gene",
        "single_unseen",
    ]
    assert list(ours["n_cells"]) == [4, 3, 2, 2]

    # no-change predicts a zero change: Pearson undefined, MSE = mean squared true change
    none = table[table["method"] == "no-change"].set_index("condition")
    change = truth.loc[TEST] - truth.loc["ctrl"]
    assert none[["pearson_delta", "pearson_delta_top"]].isna().all(axis=None)
    np.testing.assert_allclose(none["mse"], (change**2).mean(axis=1), rtol=1e-6)
    top3 = change.abs().apply(lambda row: row.nlargest(3).index.tolist(), axis=1)
    top_mse = [float((change.loc[c, top3[c]] ** 2).mean()) for c in TEST]
    np.testing.assert_allclose(none["mse_top"], top_mse, rtol=1e-6)


def test_table_rows_and_order(screen, truth):
    rng = np.random.default_rng(1)
    values = truth.loc[TEST].to_numpy() + rng.normal(0, 0.3, size=(4, len(GENES)))
    prediction = AnnData(values, obs=pd.DataFrame(index=TEST), var=pd.DataFrame(index=GENES))
    shuffled = prediction[[3, 1, 0, 2], ::-1].copy()  # other row and gene order
    extra_row = AnnData(
        np.vstack([values, truth.loc["A+ctrl"]]),  # a training condition is ignored
        obs=pd.DataFrame(index=[*TEST, "A+ctrl"]),
        var=pd.DataFrame(index=GENES),
    )
    table = evaluate_perturbation(
        screen,
        {"mine": prediction, "shuffled": shuffled, "extra": extra_row},
        layer="counts",
    )
    methods = ["mine", "shuffled", "extra", "no-change", "train-mean", "additive", "linear"]
    assert list(pd.unique(table["method"])) == methods
    assert list(table.loc[table["method"] == "additive", "condition"]) == ["A+B"]  # no NaN rows
    metrics = ["pearson_delta", "pearson_delta_top", "mse", "mse_top"]
    mine = table[table["method"] == "mine"][metrics].to_numpy()
    for other in ("shuffled", "extra"):
        np.testing.assert_allclose(table[table["method"] == other][metrics], mine, rtol=1e-6)
    # the scores, written out
    change = values - truth.loc["ctrl"].to_numpy()
    true_change = (truth.loc[TEST] - truth.loc["ctrl"]).to_numpy()
    expected = [np.corrcoef(change[k], true_change[k])[0, 1] for k in range(4)]
    np.testing.assert_allclose(table[table["method"] == "mine"]["pearson_delta"], expected)
    expected = ((values - truth.loc[TEST].to_numpy()) ** 2).mean(axis=1)
    np.testing.assert_allclose(table[table["method"] == "mine"]["mse"], expected)
    only_mine = evaluate_perturbation(
        screen, {"mine": prediction}, layer="counts", baselines=False
    )
    assert set(only_mine["method"]) == {"mine"} and len(only_mine) == 4

    summary = summarize_perturbation(table)
    assert summary.loc[("mine", "single_unseen"), "n_conditions"] == 2
    singles = table[(table["method"] == "mine") & (table["condition_type"] == "single_unseen")]
    np.testing.assert_allclose(
        summary.loc[("mine", "single_unseen"), "mse"], singles["mse"].mean()
    )


@pytest.mark.parametrize(
    ("name", "genes"),
    [("ctrl", ()), ("A+ctrl", ("A",)), ("ctrl+A", ("A",)), ("A", ("A",)), ("B+A", ("B", "A"))],
)
def test_condition_names(name, genes):
    assert perturbed_genes(name) == genes


@pytest.mark.parametrize("name", ["A+", "+A", "A+B+C", "A+A", "ctrl+ctrl"])
def test_malformed_condition_names(name):
    with pytest.raises(ValueError, match="Malformed condition"):
        perturbed_genes(name)


def test_errors(screen, truth):
    perfect = condition_means(screen, layer="counts", conditions=TEST)
    with pytest.raises(KeyError, match="perturbation_key='guide'"):
        evaluate_perturbation(screen, {}, perturbation_key="guide", layer="counts")
    with pytest.raises(KeyError, match="split_key='fold'"):
        perturbation_baselines(screen, split_key="fold", layer="counts")
    with pytest.raises(KeyError, match="layer='raw'"):
        evaluate_perturbation(screen, {}, layer="raw")
    with pytest.raises(ValueError, match="No control cells"):
        evaluate_perturbation(screen, {}, control_category="NT", layer="counts")
    with pytest.raises(ValueError, match="lacks the test conditions"):
        evaluate_perturbation(screen, {"m": perfect[:3]}, layer="counts")
    unknown = AnnData(
        np.vstack([perfect.X, perfect.X[:1]]),
        obs=pd.DataFrame(index=[*TEST, "Q+ctrl"]),
        var=pd.DataFrame(index=GENES),
    )
    with pytest.raises(ValueError, match="unknown conditions"):
        evaluate_perturbation(screen, {"m": unknown}, layer="counts")
    with pytest.raises(ValueError, match="genes of adata"):
        evaluate_perturbation(screen, {"m": perfect[:, 1:]}, layer="counts")
    with pytest.raises(ValueError, match="baseline names"):
        evaluate_perturbation(screen, {"additive": perfect}, layer="counts")
    with pytest.raises(ValueError, match="Unknown conditions"):
        perturbation_baselines(screen, conditions=["Q+ctrl"], layer="counts")
    with pytest.raises(ValueError, match="n_top_genes"):
        evaluate_perturbation(screen, {}, n_top_genes=0, layer="counts")
    with pytest.raises(ValueError, match="Negative values"):
        negative = screen.copy()
        negative.X = sp.csr_matrix(-negative.layers["counts"].toarray())
        evaluate_perturbation(negative, {})

    broken = screen.copy()
    broken.obs["split"] = broken.obs["split"].replace({"test": "validation"})
    with pytest.raises(ValueError, match="'train' or 'test'"):
        evaluate_perturbation(broken, {}, layer="counts")
    mixed = screen.copy()
    mixed.obs.iloc[-1, mixed.obs.columns.get_loc("split")] = "train"
    with pytest.raises(ValueError, match="split between train and test"):
        evaluate_perturbation(mixed, {}, layer="counts")
    malformed = screen.copy()
    malformed.obs["condition"] = malformed.obs["condition"].cat.rename_categories(
        {"B+C": "B+C+g3"}
    )
    with pytest.raises(ValueError, match="Malformed condition 'B\\+C\\+g3'"):
        evaluate_perturbation(malformed, {}, layer="counts")
    missing = screen.copy()
    missing.obs["condition"] = missing.obs["condition"].astype(object)
    missing.obs.iloc[0, missing.obs.columns.get_loc("condition")] = None
    with pytest.raises(ValueError, match="missing values"):
        evaluate_perturbation(missing, {}, layer="counts")
    untrained = screen.copy()
    untrained.obs["split"] = np.where(untrained.obs["condition"] == "ctrl", "train", "test")
    with pytest.raises(ValueError, match="No training perturbation"):
        perturbation_baselines(untrained, layer="counts")
