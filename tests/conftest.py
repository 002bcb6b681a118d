"""Shared pytest set-up: the device of the ``gpu``-marked tests.

Tests marked ``gpu`` (``tests/test_gpu.py``) run their model on the torch device named by the
environment variable ``CELLPLM_TEST_DEVICE`` (``cuda``, ``cuda:1``, or ``cpu`` for a dry run on
a machine without a GPU) and are skipped when it is unset, so the normal suite never needs a
GPU.
"""

from __future__ import annotations

import os

import pytest

DEVICE_VARIABLE = "CELLPLM_TEST_DEVICE"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(DEVICE_VARIABLE):
        return
    skip = pytest.mark.skip(
        reason=f"device test: set {DEVICE_VARIABLE}=cuda (or cpu for a dry run) to run it"
    )
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def test_device():
    """The ``torch.device`` of ``CELLPLM_TEST_DEVICE``; fails if it names a missing GPU."""
    import torch

    name = os.environ.get(DEVICE_VARIABLE, "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"{DEVICE_VARIABLE}={name!r}, but torch {torch.__version__} sees no GPU.")
    if device.type not in ("cuda", "cpu"):
        pytest.fail(f"{DEVICE_VARIABLE}={name!r}: use 'cuda', 'cuda:<index>' or 'cpu'.")
    return device


@pytest.fixture
def gumbel_argmax(monkeypatch):
    """The official hard Gumbel-softmax with zero noise: ``y = one_hot(argmax logits)`` (needs
    the official ``CellPLM`` package; skips without it)."""
    import torch

    autoencoders = pytest.importorskip("CellPLM.latent.autoencoders")
    monkeypatch.setattr(
        autoencoders.GumbelSoftmax,
        "sample_gumbel",
        lambda self, logits, eps=1e-20: torch.zeros_like(logits),
    )


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    """Four small .h5ad files (``tests/_helpers.py:write_corpus_files``), new for each module
    (a module's tests may leave a tissue cache next to them)."""
    from tests._helpers import write_corpus_files

    return write_corpus_files(tmp_path_factory.mktemp("corpus"))
