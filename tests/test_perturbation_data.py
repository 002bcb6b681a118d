"""The simulated Perturb-seq screen (``cp.datasets.simulate_perturbation``): naming, the
Norman-style split, seeds, and that knock-downs, the network and the interactions show in the
counts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellplm_scvi._genes import official_config, to_ensembl
from cellplm_scvi.datasets import pbmc68k_counts, simulate_perturbation
from cellplm_scvi.metrics import condition_means, evaluate_perturbation

SMALL = {"n_perturbed_genes": 10, "n_doubles": 16, "cells_per_condition": 60}
SMALL["n_control_cells"] = 200


@pytest.fixture(scope="module")
def cells():
    return pbmc68k_counts()


@pytest.fixture(scope="module")
def screen(cells):
    return simulate_perturbation(cells, **SMALL)


@pytest.fixture(scope="module")
def means(screen):
    """Observed mean log1p CP10k per condition (rows) and gene (columns)."""
    m = condition_means(screen)
    return pd.DataFrame(m.X, index=m.obs_names, columns=m.var_names)


@pytest.fixture(scope="module")
def network(screen):
    return pd.DataFrame(screen.uns["perturbation_simulation"]["network"])


def test_counts_and_layout(screen, cells, tmp_path):
    x = screen.X
    assert x.format == "csr" and x.dtype == np.float32
    assert np.array_equal(x.data, np.rint(x.data)) and x.data.min() > 0
    assert (screen.layers["counts"] != x).nnz == 0
    assert list(screen.var_names) == list(cells.var_names)
    assert screen.n_obs == 200 + (10 + 16) * 60
    for key in ("condition", "split", "condition_type", "interaction", "cell_type"):
        assert isinstance(screen.obs[key].dtype, pd.CategoricalDtype), key
    assert set(screen.obs["source_cell"]) <= set(cells.obs_names)
    screen.copy().write_h5ad(tmp_path / "screen.h5ad")  # uns holds h5ad-writable values


def test_condition_names_follow_gears(screen):
    info = screen.uns["perturbation_simulation"]
    genes = list(info["perturbed_genes"])
    names = list(screen.obs["condition"].cat.categories)
    assert names[0] == "ctrl"
    assert names[1:11] == [f"{g}+ctrl" for g in genes]
    doubles = names[11:]
    assert len(doubles) == len(set(doubles)) == 16 and list(info["doubles"]) == doubles
    for name in doubles:
        a, b = name.split("+")
        assert a < b and a in genes and b in genes
    # perturbed genes: genes of the data, in the official vocabulary, well detected
    assert set(genes) <= set(screen.var_names)
    assert np.isin(to_ensembl(genes), official_config()["gene_list"]).all()
    per_condition = screen.obs["condition"].value_counts()
    assert per_condition["ctrl"] == 200 and (per_condition.drop("ctrl") == 60).all()


def test_norman_split(screen):
    obs = screen.obs.drop_duplicates("condition").set_index("condition")
    held_out = set(screen.uns["perturbation_simulation"]["held_out_genes"])
    assert len(held_out) == round(0.25 * 10)
    assert obs.loc["ctrl", "split"] == "train" and obs.loc["ctrl", "condition_type"] == "ctrl"
    eligible = []
    for name, row in obs.drop("ctrl").iterrows():
        genes = [g for g in name.split("+") if g != "ctrl"]
        if len(genes) == 1:
            unseen = genes[0] in held_out
            assert row["split"] == ("test" if unseen else "train"), name
            assert row["condition_type"] == ("single_unseen" if unseen else "single_seen")
        elif held_out & set(genes):
            assert (row["split"], row["condition_type"]) == ("test", "double_unseen_gene")
        else:
            eligible.append(name)
            expected = "double_seen" if row["split"] == "train" else "double_unseen"
            assert row["condition_type"] == expected, name
    n_train = (obs.loc[eligible, "split"] == "train").sum()
    assert eligible and n_train == round(0.5 * len(eligible))
    # the metrics derive the same types from the split alone
    table = evaluate_perturbation(screen, {}, baselines=True)
    derived = table.drop_duplicates("condition").set_index("condition")["condition_type"]
    assert (derived == obs.loc[derived.index, "condition_type"].astype(str)).all()


def test_seeds(screen, cells):
    again = simulate_perturbation(cells, **SMALL)
    assert (again.X != screen.X).nnz == 0 and again.obs.equals(screen.obs)
    resplit = simulate_perturbation(cells, **SMALL, split_seed=1)
    assert (resplit.X != screen.X).nnz == 0  # the same cells...
    assert (resplit.obs["condition"] == screen.obs["condition"]).all()
    assert not (resplit.obs["split"] == screen.obs["split"]).all()  # ... another split
    assert resplit.uns["perturbation_simulation"]["split_seed"] == 1
    other = simulate_perturbation(cells, **SMALL, seed=1)
    assert set(other.obs["condition"]) != set(screen.obs["condition"])


def test_interaction_mix_is_exact(screen):
    info = screen.uns["perturbation_simulation"]
    kinds = pd.Series(info["interaction"]).value_counts()
    assert kinds.to_dict() == {"additive": 8, "synergistic": 4, "buffering": 4}
    factor = pd.Series(info["interaction_factor"], index=info["interaction"])
    assert (factor["additive"] == 1).all()
    assert factor["synergistic"].between(1.6, 2.4).all()
    assert factor["buffering"].between(0.2, 0.5).all()
    per_cell = screen.obs.drop_duplicates("condition").set_index("condition")["interaction"]
    assert (per_cell[list(info["doubles"])] == list(info["interaction"])).all()
    assert (per_cell.drop(list(info["doubles"])) == "none").all()


def test_knockdown_lowers_the_target(screen, means):
    control = means.loc["ctrl"]
    for gene in screen.uns["perturbation_simulation"]["perturbed_genes"]:
        assert means.loc[f"{gene}+ctrl", gene] < control[gene] - 0.5, gene


def test_downstream_genes_move(screen, means, network):
    """Direct targets move in the direction of their edge (a knock-down lowers the targets
    of an activating edge), more than other genes; genes two edges away move too."""
    control = means.loc["ctrl"]
    agree, direct, rest = [], [], []
    for gene in screen.uns["perturbation_simulation"]["perturbed_genes"]:
        change = means.loc[f"{gene}+ctrl"] - control
        edges = network[network["regulator"] == gene]
        agree += list(np.sign(change[edges["target"]].to_numpy()) == -np.sign(edges["weight"]))
        direct.append(change[edges["target"]].abs().mean())
        rest.append(change.drop([*edges["target"], gene]).abs().mean())
    assert np.mean(agree) > 0.8
    assert np.mean(direct) > 2 * np.mean(rest)

    weight = network.set_index(["regulator", "target"])["weight"]
    regulators = set(screen.uns["perturbation_simulation"]["perturbed_genes"])
    two_step = []
    for (first, second), w1 in weight.items():
        if second not in regulators:
            continue
        change = means.loc[f"{first}+ctrl"] - control
        for target, w2 in weight.xs(second, level="regulator").items():
            if (first, target) not in weight.index and target not in regulators:
                two_step.append(np.sign(change[target]) == -np.sign(w1 * w2))
    assert len(two_step) > 10 and np.mean(two_step) > 0.65


def test_controls_carry_the_network(screen, network):
    """Natural regulator activity: across control cells, a regulator co-varies with its
    targets in the direction of the edge."""
    control = screen[screen.obs["condition"] == "ctrl"].X.toarray()
    lognorm = pd.DataFrame(
        np.log1p(control / control.sum(1, keepdims=True) * 1e4), columns=screen.var_names
    )
    signed = [
        np.sign(w) * np.corrcoef(lognorm[r], lognorm[t])[0, 1]
        for r, t, w in network[["regulator", "target", "weight"]].itertuples(index=False)
        if lognorm[t].std() > 0
    ]
    assert np.mean(signed) > 0.02


def test_interactions_change_the_doubles(screen, means, network):
    """Regressing a double's downstream change on the sum of its singles' changes: the slope
    is largest for synergistic doubles, then additive, then buffering."""
    control = means.loc["ctrl"]
    info = screen.uns["perturbation_simulation"]
    slopes: dict[str, list[float]] = {"additive": [], "synergistic": [], "buffering": []}
    for name, kind in zip(info["doubles"], info["interaction"]):
        a, b = name.split("+")
        expected = means.loc[f"{a}+ctrl"] + means.loc[f"{b}+ctrl"] - 2 * control
        downstream = sorted(set(network.loc[network["regulator"].isin([a, b]), "target"]) - {a, b})
        observed = means.loc[name] - control
        slopes[kind].append(np.polyfit(expected[downstream], observed[downstream], 1)[0])
    mean = {kind: np.mean(s) for kind, s in slopes.items()}
    assert mean["synergistic"] > mean["additive"] + 0.2
    assert mean["additive"] > mean["buffering"] + 0.2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_perturbed_genes": 1}, "n_perturbed_genes"),
        ({"n_perturbed_genes": 4, "n_doubles": 7}, "exceeds the 6 pairs"),
        ({"n_perturbed_genes": 500}, "cannot perturb"),
        ({"cells_per_condition": 0}, "cells_per_condition"),
        ({"interaction_mix": (0.5, 0.5, 0.5)}, "interaction_mix"),
        ({"interaction_mix": (1.0, 0.0)}, "interaction_mix"),
        ({"held_out_single_fraction": 1.0}, "held_out_single_fraction"),
        ({"train_double_fraction": -0.1}, "train_double_fraction"),
        ({"thinning": 0.0}, "thinning"),
    ],
)
def test_bad_arguments(cells, kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate_perturbation(cells, **{**SMALL, **kwargs})


def test_gene_names_that_clash_with_the_naming(cells):
    renamed = cells[:, :50].copy()
    renamed.var_names = ["ctrl", "A+B", *renamed.var_names[2:]]
    with pytest.raises(ValueError, match="may not contain"):
        simulate_perturbation(renamed, **SMALL)
