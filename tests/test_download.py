"""Official weights by name: the cache, a download from a local HTTP server (no network), a
corrupt and an interrupted download (nothing cached), and the message when nothing is found."""

from __future__ import annotations

import functools
import http.server
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from anndata import AnnData

import cellplm_scvi as cp
from cellplm_scvi.official import _download
from cellplm_scvi.official._download import OFFICIAL_RELEASES, OfficialRelease, official_files

NAME = "20231027_85M"


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """A folder with a small random checkpoint in the official format, named as a release."""
    folder = tmp_path_factory.mktemp("server")
    cp.datasets.random_official_checkpoint(folder / NAME, n_hidden=16, n_layers=1, n_latent=8)
    return folder


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; ``truncate=True`` announces the full length, sends half and closes."""

    truncate = False

    def copyfile(self, source, outputfile):
        if not self.truncate:
            return super().copyfile(source, outputfile)
        data = source.read()
        outputfile.write(data[: len(data) // 2])
        outputfile.flush()
        self.close_connection = True

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def serve():
    """``serve(folder, truncate=False)`` -> base URL of an HTTP server on 127.0.0.1."""
    servers = []

    def start(folder: Path, truncate: bool = False) -> str:
        handler = type("Handler", (_Handler,), {"truncate": truncate})
        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(handler, directory=str(folder))
        )
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("CELLPLM_HOME", str(folder))
    monkeypatch.delenv("CELLPLM_URL", raising=False)
    return folder


def _cached_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def _adata(config_path: Path, n_cells: int = 20) -> AnnData:
    import json

    genes = json.loads(config_path.read_text())["gene_list"][:50]
    counts = np.random.default_rng(0).poisson(1.0, (n_cells, len(genes))).astype(np.float32)
    adata = AnnData(counts)
    adata.var_names = genes
    cp.CellPLM.setup_anndata(adata, tissue_key=None)
    return adata


def test_download_by_name_then_cache_hit(release, serve, cache, caplog):
    url = serve(release)
    with caplog.at_level(logging.INFO, logger="cellplm_scvi"):
        config_path, ckpt_path = official_files(NAME, url=url)
    assert (config_path, ckpt_path) == (cache / f"{NAME}.config.json", cache / f"{NAME}.best.ckpt")
    assert ckpt_path.read_bytes() == (release / f"{NAME}.best.ckpt").read_bytes()
    assert _cached_files(cache) == [f"{NAME}.best.ckpt", f"{NAME}.config.json"]  # no leftovers
    digest = _download.file_sha256(ckpt_path)
    assert digest in caplog.text  # printed for the user to pin

    # the cache answers without any server; load_official takes the name
    model = cp.CellPLM.load_official(NAME, _adata(config_path))
    assert model.module.n_latent == 8

    # a pinned hash is checked on a cache hit too
    pinned = OfficialRelease("test", sha256={ckpt_path.name: digest})
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(OFFICIAL_RELEASES, NAME, pinned)
        assert official_files(NAME) == (config_path, ckpt_path)
        mp.setitem(OFFICIAL_RELEASES, NAME, OfficialRelease("test", {ckpt_path.name: "0" * 64}))
        with pytest.raises(ValueError, match="SHA-256"):
            official_files(NAME)


def test_download_with_env_url_and_registered_hash(release, serve, cache, monkeypatch):
    monkeypatch.setenv("CELLPLM_URL", serve(release) + "/")
    hashes = {p.name: _download.file_sha256(p) for p in release.iterdir()}
    monkeypatch.setitem(OFFICIAL_RELEASES, NAME, OfficialRelease("test", sha256=hashes))
    config_path, _ = official_files(NAME, progressbar=False)
    assert config_path.parent == cache


def test_checksum_mismatch_caches_nothing(release, serve, cache, monkeypatch):
    wrong = {f"{NAME}.best.ckpt": "f" * 64}
    monkeypatch.setitem(OFFICIAL_RELEASES, NAME, OfficialRelease("test", sha256=wrong))
    with pytest.raises(ValueError, match="SHA-256"):
        official_files(NAME, url=serve(release), progressbar=False)
    assert _cached_files(cache) == []


def test_corrupt_download_caches_nothing(release, serve, cache, tmp_path):
    # no hash registered: the strict load refuses a file that is not an official checkpoint
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / f"{NAME}.config.json").write_bytes((release / f"{NAME}.config.json").read_bytes())
    ckpt = (release / f"{NAME}.best.ckpt").read_bytes()
    (bad / f"{NAME}.best.ckpt").write_bytes(ckpt[:1000] + b"\0" * 100 + ckpt[1100:])
    with pytest.raises(ValueError, match="not a readable official CellPLM release"):
        official_files(NAME, url=serve(bad), progressbar=False)
    assert _cached_files(cache) == []


def test_interrupted_download_caches_nothing(release, serve, cache):
    with pytest.raises(OSError, match="failed.*nothing was cached"):
        official_files(NAME, url=serve(release, truncate=True), progressbar=False)
    assert _cached_files(cache) == []


def test_not_found_anywhere_says_where_the_weights_come_from(cache, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        official_files(NAME)
    message = str(info.value)
    for part in [
        "dropbox.com",
        "github.com/OmicsML/CellPLM",
        "BSD-2-Clause",
        f"{NAME}.config.json",
        f"{NAME}.best.ckpt",
        str(cache),
        "CELLPLM_URL",
        "sizes are not published",
    ]:
        assert part in message, part
    # a path prefix without its files: the same information, naming that folder
    for prefix in (NAME, f"{NAME}.best.ckpt"):
        with pytest.raises(FileNotFoundError, match="dropbox.com") as info:
            official_files(str(tmp_path / "ckpt" / prefix))
        assert str(tmp_path / "ckpt") in str(info.value)
        assert f" {NAME}.config.json and {NAME}.best.ckpt " in str(info.value)
