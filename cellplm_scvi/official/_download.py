"""Finding the authors' released weights: a name -> (config path, checkpoint path).

An official CellPLM release is two files sharing a prefix, ``<name>.config.json`` and
``<name>.best.ckpt``. :func:`official_files` turns what a user passes to
:meth:`~cellplm_scvi.CellPLM.load_official` into the paths of those two files:

1. a ``(config_path, checkpoint_path)`` pair, or a path prefix whose two files exist: as is;
2. a bare name such as ``"20231027_85M"``: the files in the cache directory
   (:func:`cache_dir`: ``$CELLPLM_HOME``, else ``~/.cache/cellplm_scvi``);
3. else, when a download URL is configured (the ``url`` argument or ``$CELLPLM_URL``): both files
   are downloaded from ``<url>/<name>.config.json`` and ``<url>/<name>.best.ckpt`` with a progress
   bar, checked (the SHA-256 of :data:`OFFICIAL_RELEASES` where one is registered; a strict load
   as an official checkpoint always), and only then moved into the cache;
4. else a :class:`FileNotFoundError` says where the files come from and where to put them.

The authors publish the files in a Dropbox folder (:data:`OFFICIAL_SOURCE`) and no checksums,
so no hash is registered here: after a download the SHA-256 of each file is logged, for a user
to pin in :data:`OFFICIAL_RELEASES` (``OFFICIAL_RELEASES[name] = OfficialRelease(...)``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import _files

logger = logging.getLogger("cellplm_scvi")

CACHE_ENV = "CELLPLM_HOME"  # cache directory of the official files
URL_ENV = "CELLPLM_URL"  # base URL holding <name>.config.json and <name>.best.ckpt
DEFAULT_CACHE = Path("~/.cache/cellplm_scvi")
# the authors' README ("Pretrained CellPLM Model Checkpoints") links this shared folder
OFFICIAL_SOURCE = (
    "https://www.dropbox.com/scl/fo/i5rmxgtqzg7iykt2e9uqm/h?rlkey=o8hi0xads9ol07o48jdityzv1&dl=0"
)
OFFICIAL_REPOSITORY = "https://github.com/OmicsML/CellPLM"
CONFIG_SUFFIX, CHECKPOINT_SUFFIX = ".config.json", ".best.ckpt"


@dataclass(frozen=True)
class OfficialRelease:
    """What is known of one official release.

    Parameters
    ----------
    description
        One line for messages (latent type, where it is used).
    sha256
        File name -> expected SHA-256 (hex). Empty when no hash is known: the authors publish
        none, so the built-in entries have none. A user who checked a download can pin its
        hashes (logged after every download) by registering an entry with them.
    url
        Base URL to download from when neither the ``url`` argument nor ``$CELLPLM_URL`` is
        given (``None``: no known direct URL; the Dropbox folder is not one).
    """

    description: str
    sha256: dict[str, str] = field(default_factory=dict)
    url: str | None = None


OFFICIAL_RELEASES: dict[str, OfficialRelease] = {
    "20231027_85M": OfficialRelease(
        "VAE latent; used by the authors' embedding and imputation tutorials"
    ),
    "20230926_85M": OfficialRelease(
        "GMVAE latent; the version the official README calls the latest (10/10/2023)"
    ),
}


def cache_dir() -> Path:
    """The folder searched for official files by name: ``$CELLPLM_HOME``, else
    ``~/.cache/cellplm_scvi``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_names(name: str) -> tuple[str, str]:
    return name + CONFIG_SUFFIX, name + CHECKPOINT_SUFFIX


def _bare_name(prefix: str) -> str | None:
    """``"20231027_85M"`` (optionally with a file suffix) -> the name; a path -> ``None``."""
    for suffix in (CONFIG_SUFFIX, CHECKPOINT_SUFFIX):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
    if not prefix or prefix in (".", "..") or Path(prefix).name != prefix or "/" in prefix:
        return None
    return prefix


def official_files(
    prefix: str | os.PathLike | Sequence[str],
    url: str | None = None,
    progressbar: bool = True,
) -> tuple[Path, Path]:
    """The config and checkpoint paths of an official release, downloading it if needed.

    Parameters
    ----------
    prefix
        A release name (``"20231027_85M"``: looked up in :func:`cache_dir`, else downloaded),
        a path prefix ``"<dir>/<name>"`` of existing files, or a
        ``(config_path, checkpoint_path)`` pair (returned as is).
    url
        Base URL holding ``<name>.config.json`` and ``<name>.best.ckpt`` (default:
        ``$CELLPLM_URL``, else the release's registered URL). Used only for a name that is not
        in the cache.
    progressbar
        Show a progress bar while downloading.

    Returns
    -------
    ``(config_path, checkpoint_path)``.

    Raises
    ------
    FileNotFoundError
        If the files are neither at the path, nor in the cache, nor downloadable; the message
        gives the official source, the file names and where to put the files.
    ValueError
        If a file does not match its registered SHA-256, or a download is not a readable
        official checkpoint (nothing is cached then).
    OSError
        If a download fails (connection refused or closed mid-file; nothing is cached).
    """
    if isinstance(prefix, tuple | list):
        return _files.official_paths(tuple(prefix))
    config_path, ckpt_path = _files.official_paths(prefix)
    if config_path.is_file() and ckpt_path.is_file():
        return config_path, ckpt_path
    name = _bare_name(str(prefix))
    if name is None:  # a path: the files are not there
        stem = config_path.name[: -len(CONFIG_SUFFIX)]
        raise FileNotFoundError(_not_found_message(stem, config_path.parent))
    cached = _files.official_paths(cache_dir() / name)
    if cached[0].is_file() and cached[1].is_file():
        registered = OFFICIAL_RELEASES[name].sha256 if name in OFFICIAL_RELEASES else {}
        for path in cached:
            if path.name in registered:  # hashing a large file only where it is checked
                _check_registered_hash(name, path)
        return cached
    release = OFFICIAL_RELEASES.get(name)
    url = url or os.environ.get(URL_ENV) or (release.url if release else None)
    if not url:
        raise FileNotFoundError(_not_found_message(name, None))
    return _download(name, url, progressbar)


def _check_registered_hash(name: str, path: Path) -> str:
    """Compare ``path`` with its registered SHA-256 (if any); return the file's hash."""
    digest = file_sha256(path)
    release = OFFICIAL_RELEASES.get(name)
    expected = release.sha256.get(path.name) if release else None
    if expected is not None and digest != expected.lower():
        raise ValueError(
            f"{path} has SHA-256 {digest}, not the {expected} registered for {name!r} in "
            "cellplm_scvi.official.OFFICIAL_RELEASES: the file is corrupt or another version. "
            "Delete it and download it again."
        )
    return digest


def _download(name: str, url: str, progressbar: bool) -> tuple[Path, Path]:
    """Download both files into a staging folder, check them, then move them into the cache."""
    import pooch

    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=f".{name}.download-"))
    pooch_logger = pooch.get_logger()  # its own INFO lines ("use this value as known_hash")
    pooch_level = pooch_logger.level
    try:
        pooch_logger.setLevel(logging.WARNING)
        staged = []
        for fname in _file_names(name):
            source = f"{url.rstrip('/')}/{fname}"
            logger.info("Downloading %s", source)
            try:
                pooch.retrieve(
                    source, known_hash=None, fname=fname, path=staging, progressbar=progressbar
                )
            except OSError as err:  # requests' errors are OSErrors
                raise OSError(
                    f"Downloading {source} failed ({type(err).__name__}: {err}); nothing was "
                    f"cached. Check the URL ({URL_ENV} or url=) or place the files by hand:\n"
                    + _where_to_put(name)
                ) from err
            staged.append(staging / fname)
        hashes = {path.name: _check_registered_hash(name, path) for path in staged}
        _check_loads(*staged)
        targets = _files.official_paths(cache / name)
        for path, target in zip(staged, targets):
            os.replace(path, target)
    finally:
        pooch_logger.setLevel(pooch_level)
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "Downloaded %s into %s. To pin these files' SHA-256: "
        "cellplm_scvi.official.OFFICIAL_RELEASES[%r] = OfficialRelease(%r, sha256=%r)",
        name,
        cache,
        name,
        OFFICIAL_RELEASES[name].description if name in OFFICIAL_RELEASES else name,
        hashes,
    )
    return targets


def _check_loads(config_path: Path, ckpt_path: Path) -> None:
    """Refuse files that are not a strictly loadable official release (``ValueError``)."""
    from ..module import CellPLMModule

    try:
        config = _files.read_config(config_path)
        state = _files.read_state_dict(ckpt_path)
        kwargs = _files.model_kwargs(config)
        vocabulary = kwargs.pop("vocabulary")
        kwargs.pop("use_batch_covariate")
        module = CellPLMModule(n_vocab=len(vocabulary), **kwargs)
        _files.load_strict(module, state)
    except ValueError as err:
        raise ValueError(
            f"The downloaded files are not a readable official CellPLM release; nothing was "
            f"cached. {err}"
        ) from None


def _where_to_put(name: str) -> str:
    config_name, ckpt_name = _file_names(name)
    return (
        f"  put {config_name} and {ckpt_name} in {cache_dir()} (or set {CACHE_ENV} to their "
        f'folder) and pass the name "{name}", or pass the path prefix "<folder>/{name}"'
    )


def _not_found_message(name: str, folder: Path | None) -> str:
    """Where the official files come from, what they are called and where to put them."""
    config_name, ckpt_name = _file_names(name)
    looked = [str(folder)] if folder is not None else [str(cache_dir())]
    release = OFFICIAL_RELEASES.get(name)
    known = f" ({release.description})" if release else ""
    releases = ", ".join(OFFICIAL_RELEASES)
    return (
        f"The official CellPLM release {name!r}{known} was not found: {config_name} and "
        f"{ckpt_name} are not both in {' or '.join(looked)}.\n"
        f"Source: the authors' Dropbox folder {OFFICIAL_SOURCE} , linked from the README of "
        f"{OFFICIAL_REPOSITORY} (code under the BSD-2-Clause licence; no separate licence "
        "is stated for the weights).\n"
        f"Files: {config_name} (config and gene list) and {ckpt_name} (weights); sizes are not "
        "published (85M float32 parameters: roughly 0.3-0.4 GB for the checkpoint). Known "
        f"releases: {releases}.\n"
        "Then either\n"
        + _where_to_put(name)
        + f",\n  or set {URL_ENV} (or pass url= to cellplm_scvi.official.official_files) to a "
        "base URL serving both files, to download them into that folder."
    )
