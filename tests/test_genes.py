"""Tests for the vendored gene vocabulary, symbol table and gene alignment."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

from cellplm_scvi._genes import (
    GeneAlignment,
    align_genes,
    available_configs,
    official_config,
    symbol_table,
    to_ensembl,
)

N_VOCAB = 19_374


@pytest.fixture(scope="module")
def vocab() -> list[str]:
    return official_config()["gene_list"]


@pytest.fixture(scope="module")
def table():
    return symbol_table()


# ---------------------------------------------------------------- vendored resources


def test_official_config_vocabulary(vocab):
    config = official_config("20230926_85M")
    assert "20230926_85M" in available_configs()
    assert len(vocab) == N_VOCAB
    assert vocab == sorted(vocab)
    assert len(set(vocab)) == N_VOCAB
    assert all(g.startswith("ENSG") and "." not in g for g in vocab)
    assert vocab[0] == "ENSG00000000003"
    # model-config keys come along with the gene list
    assert {"enc_mod", "enc_hid", "enc_layers", "latent_mod", "post_latent_dim"} <= set(config)


def test_official_config_returns_copy():
    config = official_config()
    config["gene_list"].clear()
    config["enc_hid"] = -1
    fresh = official_config()
    assert len(fresh["gene_list"]) == N_VOCAB
    assert fresh["enc_hid"] != -1


def test_official_config_unknown_name():
    with pytest.raises(ValueError, match="available"):
        official_config("no_such_ckpt")


def test_symbol_table_covers_vocabulary(table, vocab):
    assert list(table.columns) == ["ensembl_id", "symbol"]
    assert len(table) == N_VOCAB
    assert not table["ensembl_id"].duplicated().any()
    assert set(table["ensembl_id"]) == set(vocab)
    assert (table["symbol"].str.len() > 0).all()


# ---------------------------------------------------------------- to_ensembl


@pytest.mark.parametrize(
    ("symbol", "ensembl"),
    [
        ("TP53", "ENSG00000141510"),
        ("ACTB", "ENSG00000075624"),
        ("CD3E", "ENSG00000198851"),
        ("MKKS", "ENSG00000125863"),  # one symbol, three IDs: first row in table order wins
    ],
)
def test_known_symbols(symbol, ensembl):
    assert to_ensembl([symbol])[0] == ensembl


def test_symbols_round_trip_table(table):
    # a deterministic spread of rows whose symbol names a single vocabulary gene
    unique = table[~table["symbol"].duplicated(keep=False)]
    sample = unique.iloc[:: len(unique) // 50]
    assert len(sample) >= 50
    np.testing.assert_array_equal(to_ensembl(list(sample["symbol"])), sample["ensembl_id"])


def test_to_ensembl_case_fallback_and_unknowns():
    out = to_ensembl(["tp53", "Actb", " CD3E ", "NOT_A_GENE_XYZ", "", None, float("nan")])
    assert out.dtype == object
    assert out.shape == (7,)
    assert list(out[:3]) == ["ENSG00000141510", "ENSG00000075624", "ENSG00000198851"]
    assert all(x is None for x in out[3:])


def test_to_ensembl_version_suffix():
    out = to_ensembl(
        ["ENSG00000141510.17", "ENSG00000075624", "ENSG00000182378.14_PAR_Y", "ensg00000198851.2"]
    )
    assert list(out) == [
        "ENSG00000141510",
        "ENSG00000075624",
        "ENSG00000182378",
        "ENSG00000198851",
    ]
    # an Ensembl ID outside the table is still returned (version stripped), not dropped
    assert to_ensembl(["ENSG99999999999.3"])[0] == "ENSG99999999999"


# ---------------------------------------------------------------- align_genes


def test_align_mixed_inputs(vocab, caplog):
    genes = ["TP53", "unknown_1", "ENSG00000075624.14", "cd3e", "ENSG99999999999", "unknown_2"]
    with caplog.at_level(logging.INFO, logger="cellplm_scvi"):
        al = align_genes(genes, vocab)
    assert isinstance(al, GeneAlignment)
    assert al.n_input == 6
    assert al.n_matched == 3
    assert al.input_index.dtype == np.int64
    assert al.vocab_index.dtype == np.int64
    np.testing.assert_array_equal(al.input_index, [0, 2, 3])
    assert [vocab[i] for i in al.vocab_index] == [
        "ENSG00000141510",
        "ENSG00000075624",
        "ENSG00000198851",
    ]
    assert al.unmatched == ["unknown_1", "ENSG99999999999", "unknown_2"]
    assert "3 of 6 genes matched the vocabulary" in caplog.text


def test_align_shuffled_subset_consistent(vocab, table):
    rng = np.random.default_rng(0)
    rows = rng.choice(N_VOCAB, size=500, replace=False)
    ids = [vocab[r] for r in rows]
    # half as versioned Ensembl IDs, half as symbols (where the symbol is unambiguous)
    sym_of = dict(zip(table["ensembl_id"], table["symbol"]))
    ambiguous = set(table["symbol"][table["symbol"].duplicated(keep=False)])
    genes = [
        (f"{e}.{k % 9 + 1}" if k % 2 or sym_of[e] in ambiguous else sym_of[e])
        for k, e in enumerate(ids)
    ]
    genes += ["junk_a", "junk_b"]
    order = rng.permutation(len(genes))
    shuffled = [genes[i] for i in order]
    expected = dict(zip(genes, [*ids, None, None]))

    al = align_genes(shuffled, vocab)
    assert al.n_matched == 500
    assert sorted(al.unmatched) == ["junk_a", "junk_b"]
    assert np.all(np.diff(al.input_index) > 0)
    assert len(set(al.vocab_index.tolist())) == 500
    for i, v in zip(al.input_index, al.vocab_index):
        assert vocab[v] == expected[shuffled[i]]


def test_align_full_vocabulary_identity(vocab):
    al = align_genes(vocab, vocab)
    assert al.n_matched == N_VOCAB
    np.testing.assert_array_equal(al.input_index, np.arange(N_VOCAB))
    np.testing.assert_array_equal(al.vocab_index, np.arange(N_VOCAB))
    assert al.unmatched == []


def test_align_result_is_frozen(vocab):
    al = align_genes(["TP53", "ACTB"], vocab)
    with pytest.raises(AttributeError):
        al.n_matched = 0  # type: ignore[misc]
    with pytest.raises(ValueError):
        al.vocab_index[0] = 1


def test_align_duplicate_genes_error(vocab):
    with pytest.raises(ValueError, match="TP53") as err:
        align_genes(["TP53", "ACTB", "TP53"], vocab)
    assert "var_names_make_unique" in str(err.value)
    assert "gene_key" in str(err.value)


def test_align_zero_match_error(vocab):
    with pytest.raises(ValueError, match="ENSG00000000003") as err:
        align_genes(["Gene1", "Gene2", "Gene3"], vocab)
    assert "symbols" in str(err.value)
    assert "Gene1" in str(err.value)


def test_align_duplicate_mapping_warns(vocab):
    genes = ["ENSG00000141510.17", "ACTB", "TP53", "tp53"]
    with pytest.warns(UserWarning, match="already matched"):
        al = align_genes(genes, vocab)
    np.testing.assert_array_equal(al.input_index, [0, 1])
    assert [vocab[i] for i in al.vocab_index] == ["ENSG00000141510", "ENSG00000075624"]
    assert al.unmatched == ["TP53", "tp53"]


def test_align_no_warning_without_clash(vocab):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        align_genes(["TP53", "ACTB", "nope"], vocab)


def test_align_pbmc68k_reduced(vocab):
    sc = pytest.importorskip("scanpy")
    adata = sc.datasets.pbmc68k_reduced()
    genes = adata.raw.var_names
    assert len(genes) == 765
    al = align_genes(genes, vocab)
    assert al.n_matched >= 600
    assert al.n_matched + len(al.unmatched) == 765
    mapped = to_ensembl(list(genes))
    for i, v in zip(al.input_index, al.vocab_index):
        assert mapped[i] == vocab[v]
