"""``CellPLM.save`` / ``load`` and the other readers of a model directory.

Each reader refuses a ``model.pt`` holding pickled objects without running them; a save killed at
any point leaves the old or the new model, each with its own AnnData; weights and the saved
AnnData are checked against the SHA-256 saved with them; a full disk and a damaged ``data.pkl``
give clear errors. A trained model (``fitted``, ``gmvae_model`` of ``tests/conftest.py``) round
trips exactly (weights, history, embeddings) and trains on after loading, in train mode.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import resource
import shlex
import signal
import struct
import sys
import time
import zipfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from lightning.pytorch.callbacks import Callback

import cellplm_scvi as cp
from cellplm_scvi import CellPLM
from tests._anndata_checks import unregistered
from tests._helpers import FIT, FOV_VAL, VALIDATE_EVERY_EPOCH, history_values, renamed_genes

ARCH = {"n_hidden": 16, "n_layers": 1, "n_heads": 2, "n_latent": 4}
N_GENES = 50
KILLED = 77  # exit status of a save stopped at its kill point

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked save (POSIX)")


def _anndata(n_cells: int, version: str) -> ad.AnnData:
    adata = cp.datasets.simulate_tissue(n_cells=n_cells, n_slides=1, seed=0)[:, :N_GENES].copy()
    adata.obs["version"] = version
    return adata


def _model(n_cells: int, version: str, seed: int) -> CellPLM:
    adata = _anndata(n_cells, version)
    CellPLM.setup_anndata(adata, layer="counts")
    scvi.settings.seed = seed
    return CellPLM(adata, **ARCH)


@pytest.fixture(scope="module")
def old():
    return _model(60, "old", seed=0)


@pytest.fixture(scope="module")
def new():
    return _model(40, "new", seed=1)


def _same_weights(a: CellPLM, b: CellPLM) -> bool:
    sa, sb = a.module.state_dict(), b.module.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _version(dir_path: Path, old: CellPLM, new: CellPLM) -> str:
    """Which model ``load`` reads from ``dir_path``; its AnnData must be that save's."""
    loaded = CellPLM.load(dir_path)
    version = (
        "old" if _same_weights(loaded, old) else "new" if _same_weights(loaded, new) else None
    )
    assert version is not None, "the loaded weights are neither the old nor the new model's"
    saved = old if version == "old" else new
    assert set(loaded.adata.obs["version"]) == {version}, "model paired with another AnnData"
    assert list(loaded.adata.obs_names) == list(saved.adata.obs_names)
    return version


def _payload(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _without_checksums(dir_path: Path) -> None:
    """Make ``model.pt`` a file as saved before the checksums existed."""
    payload = _payload(dir_path / "model.pt")
    del payload["cellplm_checksums"]
    torch.save(payload, dir_path / "model.pt")


# ------------------------------------------------------------------ D1: hostile files


class _Touch:
    """Unpickling this creates ``path`` (via ``Path.touch``): a harmless stand-in for a payload."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


class _System:
    """Unpickling this runs a shell command through ``os.system`` (which creates ``path``)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.path))}",))


def _hostile_file(path: Path, payload: str, marker: Path) -> None:
    obj = {"attr_dict": {"cellplm_format_": "cellplm_scvi/2"}, "x": None}
    obj["x"] = _System(marker) if payload == "os_system" else _Touch(marker)
    if payload == "raw_pickle":
        path.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, path)


READERS = {
    "load": lambda d, adata: CellPLM.load(d, adata=adata),
    "load_registry": lambda d, adata: CellPLM.load_registry(d),
    "view_setup_args": lambda d, adata: CellPLM.view_setup_args(d),
    "load_query_data": lambda d, adata: CellPLM.load_query_data(adata, d),
    "prepare_query_anndata": lambda d, adata: CellPLM.prepare_query_anndata(adata, d),
}


@pytest.mark.parametrize("payload", ["os_system", "class", "raw_pickle"])
@pytest.mark.parametrize("reader", list(READERS))
def test_readers_refuse_pickled_objects_without_running_them(tmp_path, reader, payload):
    marker = tmp_path / "MARKER"
    (tmp_path / "m").mkdir()
    _hostile_file(tmp_path / "m" / "model.pt", payload, marker)
    with pytest.raises(ValueError, match="pickled Python objects.*will not be unpickled") as err:
        READERS[reader](tmp_path / "m", _anndata(20, "query"))
    assert "corrupt" not in str(err.value)
    assert not marker.exists(), f"{reader} ran code from the file"
    pickle.loads(pickle.dumps(_Touch(marker)))  # the payload does work when unpickled
    assert marker.exists()


def test_view_setup_args_prints_without_rich_pretty_imported(old, tmp_path, monkeypatch, capsys):
    import rich

    old.save(tmp_path / "m")
    monkeypatch.delattr(rich, "pretty", raising=False)  # as in a fresh scvi-tools 1.4.2 session
    monkeypatch.delitem(sys.modules, "rich.pretty", raising=False)
    CellPLM.view_setup_args(tmp_path / "m")
    out = capsys.readouterr().out
    assert "CellPLM.setup_anndata" in out and "'layer': 'counts'" in out
    registry = CellPLM.load_registry(tmp_path / "m")
    assert registry["setup_args"]["layer"] == "counts"
    assert registry["model_name"] == "CellPLM"
    genes = registry["field_registries"]["X"]["state_registry"]["column_names"]
    assert isinstance(genes, np.ndarray) and list(genes) == list(old.adata.var_names)


# ------------------------------------------------------------------ D4, D11: damaged files


def _flip_weight_bit(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor stored in ``path`` (a torch zip)."""
    with zipfile.ZipFile(path) as archive:
        record = max(
            (i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size
        )
    data = bytearray(path.read_bytes())
    offset = record.header_offset
    name_length, extra_length = struct.unpack("<HH", data[offset + 26 : offset + 30])
    data[offset + 30 + name_length + extra_length + record.file_size // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_weight_bit_is_detected(old, tmp_path):
    old.save(tmp_path / "m", save_anndata=True)
    _flip_weight_bit(tmp_path / "m" / "model.pt")
    with pytest.raises(ValueError, match="do not match the SHA-256 saved with them"):
        CellPLM.load(tmp_path / "m")
    with pytest.raises(ValueError, match="do not match the SHA-256"):
        CellPLM.load_query_data(_anndata(20, "query"), tmp_path / "m")


def test_files_without_checksums_still_load(old, tmp_path):
    old.save(tmp_path / "m", save_anndata=True)
    _without_checksums(tmp_path / "m")
    loaded = CellPLM.load(tmp_path / "m")
    assert _same_weights(loaded, old)
    assert list(loaded.adata.obs_names) == list(old.adata.obs_names)
    # saving over it keeps working (the old file first gets its checksums)
    old.save(tmp_path / "m", overwrite=True, save_anndata=True)
    assert "cellplm_checksums" in _payload(tmp_path / "m" / "model.pt")


@pytest.mark.parametrize("word", [b"model_state_dict", b"var_names", b"cellplm_format_"])
def test_flipped_bytes_in_the_pickle_give_a_clear_error(old, tmp_path, word):
    old.save(tmp_path / "m")
    data = bytearray((tmp_path / "m" / "model.pt").read_bytes())
    position = data.index(word)  # a string in data.pkl (stored uncompressed)
    data[position] ^= 0xFF  # no longer UTF-8
    (tmp_path / "m" / "model.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError) as err:
        CellPLM.load(tmp_path / "m", adata=_anndata(60, "old"))
    assert type(err.value) is ValueError  # not a UnicodeDecodeError from torch's unpickler
    assert "is damaged (corrupt or truncated" in str(err.value)


def test_checksums_that_name_a_path_are_refused(old, tmp_path):
    old.save(tmp_path / "m", save_anndata=True)
    payload = _payload(tmp_path / "m" / "model.pt")
    payload["cellplm_checksums"]["adata"] = "../../elsewhere"  # not a SHA-256: never a path
    torch.save(payload, tmp_path / "m" / "model.pt")
    with pytest.raises(ValueError, match="'cellplm_checksums' entry is damaged"):
        CellPLM.load(tmp_path / "m")
    old.save(tmp_path / "m", overwrite=True, save_anndata=True)  # saving over it still works
    assert _same_weights(CellPLM.load(tmp_path / "m"), old)


def test_replaced_anndata_is_not_paired_with_the_model(old, new, tmp_path):
    old.save(tmp_path / "m", save_anndata=True)
    new.adata.write_h5ad(tmp_path / "m" / "adata.h5ad")
    with pytest.raises(ValueError, match="is not the AnnData saved with model.pt"):
        CellPLM.load(tmp_path / "m")


def test_load_builds_the_anndata_from_the_bytes_it_checked(old, new, tmp_path, monkeypatch):
    """``load`` reads ``adata.h5ad`` once: the AnnData is built from the bytes whose SHA-256
    was checked, so a file replaced between the check and the read is never paired."""
    old.save(tmp_path / "m", save_anndata=True)
    read_h5ad = ad.read_h5ad

    def replaced_then_read(source, *args, **kwargs):
        new.adata.write_h5ad(tmp_path / "m" / "adata.h5ad")  # another writer, just now
        return read_h5ad(source, *args, **kwargs)

    monkeypatch.setattr(ad, "read_h5ad", replaced_then_read)
    loaded = CellPLM.load(tmp_path / "m")
    assert set(loaded.adata.obs["version"]) == {"old"}
    assert list(loaded.adata.obs_names) == list(old.adata.obs_names)


def test_save_without_anndata_does_not_pair_with_an_older_one(old, new, tmp_path):
    old.save(tmp_path / "m", save_anndata=True)
    new.save(tmp_path / "m", overwrite=True)  # adata.h5ad stays: it is the old model's
    with pytest.raises(ValueError, match="save_anndata=False .*adata.h5ad there is not the one"):
        CellPLM.load(tmp_path / "m")
    assert _same_weights(CellPLM.load(tmp_path / "m", adata=_anndata(40, "new")), new)


def _in_child(work) -> bytes:
    """Run ``work()`` in a forked process; return what it returns (bytes), or its exit status."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        os.close(read_end)
        status = 0
        try:
            os.write(write_end, work())
        except BaseException as err:
            os.write(write_end, f"{type(err).__name__}: {err}".encode())
            status = 1
        os._exit(status)
    os.close(write_end)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked save hung")
        time.sleep(0.01)
    with os.fdopen(read_end, "rb") as handle:
        message = handle.read()
    return os.waitstatus_to_exitcode(done[1]), message


@needs_fork
def test_full_disk_gives_a_clear_error_and_keeps_the_old_files(old, new, tmp_path):
    old.save(tmp_path / "m", save_anndata=True)
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}

    def save_on_a_full_disk() -> bytes:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        messages = []
        for save_anndata in (True, False):
            try:
                new.save(tmp_path / "m", overwrite=True, save_anndata=save_anndata)
            except OSError as err:
                messages.append(str(err))
        return "\n".join(messages).encode()

    status, message = _in_child(save_on_a_full_disk)
    assert status == 0, message.decode()
    adata_error, model_error = message.decode().split("\n")
    assert re.match(r"Could not write adata\.h5ad in .*is the disk full", adata_error)
    assert re.match(r"Could not write model\.pt in .*is the disk full", model_error)
    assert "files already in the directory are unchanged" in model_error
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    assert _version(tmp_path / "m", old, new) == "old"


# ------------------------------------------------------------------ D2: interrupted saves


def _arm(operation: str, target: str | None, when: str, nth: int = 1) -> None:
    """Make this process exit (as if killed) at the ``nth`` matching step of a save."""
    calls = {"n": 0}

    def fire() -> bool:
        calls["n"] += 1
        return calls["n"] == nth

    if operation == "replace":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            matches = re.fullmatch(target, Path(dst).name) and fire()
            if matches and when == "before":
                os._exit(KILLED)
            real_replace(src, dst, *args, **kwargs)
            if matches:
                os._exit(KILLED)

        os.replace = replace
        return
    if operation == "write_h5ad":
        real_write, owner, name = ad.AnnData.write_h5ad, ad.AnnData, "write_h5ad"
    else:
        real_write, owner, name = torch.save, torch, "save"

    def write(*args, **kwargs):
        if not fire():
            return real_write(*args, **kwargs)
        if when == "before":
            os._exit(KILLED)
        real_write(*args, **kwargs)  # "half": the file so far, as a kill during the write
        path = next(a for a in args if isinstance(a, str | os.PathLike))
        os.truncate(path, os.path.getsize(path) // 2)
        os._exit(KILLED)

    setattr(owner, name, write)


ASIDE = r"\.adata\.[0-9a-f]{64}\.h5ad"
# (what to interrupt, the file it writes or renames to, before/after/half way, which call) ->
# the model load reads afterwards
KILL_POINTS = {
    ("write_h5ad", None, "before", 1): "old",
    ("write_h5ad", None, "half", 1): "old",
    ("replace", ASIDE, "before", 1): "old",
    ("replace", ASIDE, "after", 1): "old",  # no adata.h5ad: the old one is set aside
    ("replace", "adata.h5ad", "after", 1): "old",  # the new AnnData next to the old model
    ("torch.save", None, "half", 1): "old",
    ("replace", "model.pt", "before", 1): "old",
    ("replace", "model.pt", "after", 1): "new",  # committed; the old AnnData not yet removed
}
# over a model file saved before the checksums: it first gets them (the first model.pt write)
KILL_POINTS_OVER_UNCHECKED = {
    ("torch.save", None, "half", 1): "old",
    ("replace", "model.pt", "after", 1): "old",
    ("replace", ASIDE, "after", 1): "old",
    ("replace", "adata.h5ad", "after", 1): "old",
    ("replace", "model.pt", "after", 2): "new",
}


@needs_fork
@pytest.mark.parametrize("unchecked", [False, True], ids=["checked", "saved_before_checksums"])
def test_killed_save_leaves_the_old_or_the_new_model(old, new, tmp_path, unchecked):
    points = KILL_POINTS_OVER_UNCHECKED if unchecked else KILL_POINTS
    for i, (point, expected) in enumerate(points.items()):
        dir_path = tmp_path / str(i)
        old.save(dir_path, save_anndata=True)
        if unchecked:
            _without_checksums(dir_path)
        foreign = {"README.md": b"# model card\n", ".gitattributes": b"*.pt lfs\n"}
        for name, content in foreign.items():
            (dir_path / name).write_bytes(content)
        (dir_path / ".model.pt.abc123_x.tmp").write_bytes(b"PK")  # left by an earlier version

        def killed_save(point=point, dir_path=dir_path) -> bytes:
            _arm(*point)
            new.save(dir_path, overwrite=True, save_anndata=True)
            return b"the save ended before its kill point"

        status, message = _in_child(killed_save)
        assert status == KILLED, (point, message.decode())
        assert _version(dir_path, old, new) == expected, point
        # the next save cleans up what the killed one left; other files stay as they were
        new.save(dir_path, overwrite=True, save_anndata=True)
        assert _version(dir_path, old, new) == "new"
        names = {p.name for p in dir_path.iterdir()}
        assert names == {"model.pt", "adata.h5ad", *foreign}, point
        assert all((dir_path / n).read_bytes() == c for n, c in foreign.items())


# ---------------------------------------------------------------- model files of a trained model


MODEL_FILE_FORMAT = "cellplm_scvi/2"


class _Marker:
    """Unpickling this calls ``open(path, "w")``: a harmless stand-in for ``os.system``.

    If a loader ever unpickles it, the marker file appears.
    """

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def saved(gmvae_model, tmp_path):
    model, _ = gmvae_model
    path = tmp_path / "model"
    model.save(path)
    return path


def test_saved_model_loads_with_weights_only(gmvae_model, saved):
    model, adata = gmvae_model
    payload = _payload(saved / "model.pt")
    assert payload["attr_dict"]["cellplm_format_"] == MODEL_FILE_FORMAT
    assert list(payload["var_names"]) == list(adata.var_names)
    assert payload["attr_dict"]["registry_"]["model_name"] == "CellPLM"
    loaded = CellPLM.load(saved, adata=unregistered(adata))
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )


@pytest.mark.parametrize("kind", ["torch_save", "plain_pickle"])
def test_tampered_model_file_is_refused_without_running_code(gmvae_model, saved, tmp_path, kind):
    _, adata = gmvae_model
    marker = tmp_path / "MARKER"
    payload = {"attr_dict": {"cellplm_format_": MODEL_FILE_FORMAT}, "x": _Marker(marker)}
    if kind == "torch_save":
        torch.save(payload, saved / "model.pt")
    else:
        (saved / "model.pt").write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match="Refusing to load .*pickled Python objects|raw pickle"):
        CellPLM.load(saved, adata=unregistered(adata))
    assert not marker.exists(), "loading ran code from the file"
    pickle.loads(pickle.dumps(_Marker(marker)))  # the payload does work when unpickled
    assert marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_damaged_model_file(gmvae_model, saved, damage):
    _, adata = gmvae_model
    data = (saved / "model.pt").read_bytes()
    data = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "garbage": np.random.default_rng(0).bytes(4096),
    }[damage]
    (saved / "model.pt").write_bytes(data)
    # random bytes are not a zip archive, so torch reads them as a legacy pickle, which the
    # weights-only unpickler refuses: a (misleading but safe) "pickled objects" error
    match = "corrupt or truncated"
    with pytest.raises(ValueError, match=match):
        CellPLM.load(saved, adata=unregistered(adata))


def test_file_without_format_marker_is_refused(gmvae_model, saved):
    model, adata = gmvae_model
    torch.save({"model_state_dict": model.module.state_dict()}, saved / "model.pt")
    with pytest.raises(ValueError, match="not a CellPLM model file"):
        CellPLM.load(saved, adata=unregistered(adata))


def test_scvi_model_directory_is_refused(fov_slides, tmp_path):
    adata = fov_slides.copy()
    scvi.model.SCVI.setup_anndata(adata)
    scvi.model.SCVI(adata, n_hidden=8, n_latent=2, n_layers=1).save(tmp_path / "scvi")
    with pytest.raises(ValueError, match="Refusing to load"):
        CellPLM.load(tmp_path / "scvi", adata=unregistered(adata))


def test_other_model_class_is_refused(gmvae_model, saved):
    _, adata = gmvae_model
    payload = _payload(saved / "model.pt")
    payload["attr_dict"]["registry_"]["model_name"] = "SCANVI"
    torch.save(payload, saved / "model.pt")
    with pytest.raises(ValueError, match="holds a 'SCANVI' model, not a CellPLM"):
        CellPLM.load(saved, adata=unregistered(adata))


def test_load_into_anndata_with_fewer_genes(gmvae_model, saved):
    _, adata = gmvae_model
    with pytest.raises(ValueError, match="genes differ from the saved model"):
        CellPLM.load(saved, adata=unregistered(adata[:, :700]))


def test_load_into_anndata_with_other_genes(gmvae_model, fov_slides, saved):
    with pytest.raises(ValueError, match="var_names|genes"):
        CellPLM.load(saved, adata=renamed_genes(fov_slides))


def test_save_does_not_overwrite(gmvae_model, saved):
    model, _ = gmvae_model
    before = (saved / "model.pt").read_bytes()
    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        model.save(saved)
    assert (saved / "model.pt").read_bytes() == before
    model.save(saved, overwrite=True)
    assert _payload(saved / "model.pt")["attr_dict"]["cellplm_format_"] == MODEL_FILE_FORMAT


def test_history_round_trips_exactly(gmvae_model, saved):
    model, adata = gmvae_model
    loaded = CellPLM.load(saved, adata=unregistered(adata))
    assert set(loaded.history) == set(model.history)
    for key, frame in model.history.items():
        pd.testing.assert_frame_equal(loaded.history[key], frame, check_exact=True)


# ------------------------------------------------------------------------- round trip and resume


def test_save_load_roundtrip_and_resume(fitted, slides, tmp_path):
    model, adata = fitted
    z = model.get_latent_representation()
    model.save(tmp_path / "model", save_anndata=True)

    loaded = CellPLM.load(tmp_path / "model")
    assert loaded.is_trained
    np.testing.assert_allclose(loaded.get_latent_representation(), z, atol=1e-6)

    with_adata = CellPLM.load(tmp_path / "model", adata=adata)
    np.testing.assert_allclose(with_adata.get_latent_representation(), z, atol=1e-6)

    # an AnnData that was never set up is set up from the saved registry
    fresh = slides.copy()
    from_registry = CellPLM.load(tmp_path / "model", adata=fresh)
    np.testing.assert_allclose(from_registry.get_latent_representation(), z, atol=1e-6)

    # resume training after loading
    scvi.settings.seed = 0
    with_adata.train(max_epochs=1, train_size=0.8, **FIT, **VALIDATE_EVERY_EPOCH)
    assert with_adata.is_trained
    for key in ("train_loss", "validation_loss"):
        assert np.isfinite(with_adata.history[key].to_numpy(dtype=float)).all()
    z_resumed = with_adata.get_latent_representation()
    assert np.isfinite(z_resumed).all()
    assert np.abs(z_resumed - z).max() > 1e-6  # the weights moved
    # the original model is untouched by training its loaded copy
    np.testing.assert_array_equal(model.get_latent_representation(), z)


class _ModeSpy(Callback):
    """Records whether the module (and its latent layer) is in train mode at each step."""

    def __init__(self):
        self.modes: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        module = pl_module.module
        self.modes.append(module.training and module.latent.training)


def test_resumed_training_runs_in_train_mode(gmvae_model, saved):
    model, adata = gmvae_model
    old_train = history_values(model, "train_loss")
    loaded = CellPLM.load(saved, adata=unregistered(adata))
    assert not loaded.module.training  # load leaves eval mode for inference
    np.testing.assert_allclose(history_values(loaded, "train_loss"), old_train, rtol=1e-9)

    spy = _ModeSpy()
    scvi.settings.seed = 0
    loaded.train(max_epochs=1, callbacks=[spy], **FOV_VAL, **FIT)
    assert spy.modes and all(spy.modes), f"steps in eval mode: {spy.modes}"
    # history grows, and the new epoch has the training objective: the latent (free-bits) loss
    # is computed in train mode only, so it is zero for an eval-mode step
    train = history_values(loaded, "train_loss")
    assert len(train) == len(old_train) + 1
    np.testing.assert_allclose(train[: len(old_train)], old_train, rtol=1e-9)
    latent = history_values(loaded, "latent_loss_train")
    assert latent[-1] > 0
    assert len(history_values(loaded, "validation_loss")) == len(old_train) + 1
    assert np.isfinite(loaded.get_latent_representation()).all()


# ------------------------------------------------------ scvi-tools' file layout and readers


def test_model_file_is_scvi_layout_and_weights_only(gmvae_model, tmp_path):
    model, adata = gmvae_model
    model.save(tmp_path / "m", save_kwargs={"pickle_protocol": 2})
    payload = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    assert {"model_state_dict", "var_names", "attr_dict"} <= set(payload)
    attrs = payload["attr_dict"]
    assert {"registry_", "init_params_", "history_", "is_trained_"} <= set(attrs)
    setup = CellPLM.load_registry(tmp_path / "m")
    assert setup["setup_args"]["batch_key"] == "slide"
    import rich.pretty  # noqa: F401  (scvi-tools 1.4.2 prints with it without importing it)

    CellPLM.view_setup_args(tmp_path / "m")
    loaded = CellPLM.load(tmp_path / "m", adata=unregistered(adata))
    np.testing.assert_allclose(
        loaded.get_latent_representation(), model.get_latent_representation(), atol=1e-6
    )
    assert isinstance(loaded.history["train_loss"], pd.DataFrame)
    assert isinstance(
        loaded.adata_manager.registry["field_registries"]["batch"]["state_registry"][
            "categorical_mapping"
        ],
        np.ndarray,
    )


def test_hub_metadata_reads_a_saved_model(gmvae_model, tmp_path):
    from huggingface_hub import ModelCard
    from scvi.hub import HubMetadata, HubModel

    model, adata = gmvae_model
    model.save(tmp_path / "hub", save_anndata=True)
    metadata = HubMetadata.from_dir(
        tmp_path / "hub", anndata_version=ad.__version__, model_parent_module="cellplm_scvi"
    )
    assert metadata.model_cls_name == "CellPLM"
    hub = HubModel(tmp_path / "hub", metadata=metadata, model_card=ModelCard("CellPLM test"))
    loaded = hub.model
    assert isinstance(loaded, CellPLM)


def test_save_refuses_options_it_would_ignore(gmvae_model, tmp_path):
    model, _ = gmvae_model
    with pytest.raises(ValueError, match="save_anndata=False"):
        model.save(tmp_path / "m", legacy_mudata_format=True)
    with pytest.raises(ValueError, match="save_anndata=False"):
        model.save(tmp_path / "m", compression="gzip")
    assert not (tmp_path / "m").exists()


def test_interrupted_save_keeps_the_good_file(gmvae_model, tmp_path, monkeypatch):
    model, _ = gmvae_model
    model.save(tmp_path / "m")
    good = (tmp_path / "m" / "model.pt").read_bytes()

    def broken(obj, f, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(KeyboardInterrupt):
        model.save(tmp_path / "m", overwrite=True)
    assert (tmp_path / "m" / "model.pt").read_bytes() == good
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.pt"]


def test_first_format_files_still_load(gmvae_model, tmp_path):
    """Files of the first release (tensors + one JSON string) load unchanged."""
    model, adata = gmvae_model

    def tag(obj):  # the first format's inline tags
        if isinstance(obj, dict):
            return {str(k): tag(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [tag(v) for v in obj]
        if isinstance(obj, np.ndarray):
            return {"__ndarray__": tag(obj.tolist()), "dtype": str(obj.dtype)}
        if isinstance(obj, pd.DataFrame):
            return {"__dataframe__": {
                "index": tag(obj.index.to_numpy()), "index_name": obj.index.name,
                "columns": [str(c) for c in obj.columns],
                "data": {str(c): tag(obj[c].to_numpy()) for c in obj.columns},
            }}  # fmt: skip
        return obj.item() if isinstance(obj, np.generic) else obj

    attrs = {k: v for k, v in vars(model).items() if k.endswith("_") and not k.startswith("_")}
    (tmp_path / "old").mkdir()
    torch.save(
        {
            "format": "cellplm_scvi/1",
            "model_state_dict": model.module.state_dict(),
            "var_names": list(adata.var_names),
            "attributes": json.dumps(tag(attrs)),
        },
        tmp_path / "old" / "model.pt",
    )
    loaded = CellPLM.load(tmp_path / "old", adata=unregistered(adata))
    np.testing.assert_allclose(
        loaded.get_latent_representation(), model.get_latent_representation(), atol=1e-6
    )
