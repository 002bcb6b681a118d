"""Console output of the package: third-party chatter hidden where the package causes it,
the package's own lines shown in a plain script.

Each filter here is narrow: one library, one message pattern, only inside the package call
that triggers it, and (for log records) only on the calling thread. Every other warning or log
line still shows.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

PACKAGE_LOGGER = "cellplm_scvi"

# Lightning's INFO hints on every `Trainer.fit` (logged through its rank-zero logger): the
# accelerator summary, the "💡 Tip" lines advertising Lightning's cloud services, and the
# "`Trainer.fit` stopped: `max_epochs=...` reached" line (the progress bar shows as much)
_LIGHTNING_HINTS = (
    "lightning.pytorch.utilities.rank_zero",
    [
        r"(GPU|TPU|HPU|IPU) available: ",
        r"💡 Tip: ",
        r"`Trainer\.fit` stopped: ",
    ],
)
_LIGHTNING_DEVICES = ("lightning.pytorch.accelerators.cuda", [r"LOCAL_RANK: "])
_TRAINING_WARNINGS = [
    # torch deprecates the LeafSpec that Lightning's pytree helper still builds
    {"category": FutureWarning, "message": r"`isinstance\(treespec, LeafSpec\)` is deprecated"},
    # Lightning: an epoch has fewer steps (tissues) than its logging interval; the package
    # logs per epoch, so the hint does not apply
    {"message": r"The number of training batches \(\d+\) is smaller than the logging interval"},
]
# scvi-tools names the columns of an obsm field (the coordinates) it registers
_SETUP_LINES = ("scvi.data.fields._arraylike_field", [r"Generating sequential column names"])
# docrep reports squidpy's own docstring keys when squidpy is imported (squidpy 1.8)
_SQUIDPY_IMPORT_WARNINGS = [
    {"category": SyntaxWarning, "module": r"docrep", "message": r".* is not a valid key!"}
]


@contextmanager
def hide_log_lines(logger_name: str, patterns: Sequence[str]) -> Iterator[None]:
    """Hide the calling thread's records below WARNING of ``logger_name`` whose message starts
    with one of the regular expressions ``patterns``.

    A filter on the logger, not a change of its level: other threads' lines and every warning
    still show, and concurrent calls cannot restore a wrong level.
    """
    logger = logging.getLogger(logger_name)
    thread = threading.get_ident()
    regex = re.compile("|".join(f"(?:{p})" for p in patterns))

    def keep(record: logging.LogRecord) -> bool:  # runs in the thread that logs
        if record.levelno >= logging.WARNING or threading.get_ident() != thread:
            return True
        return regex.match(record.getMessage()) is None

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


@contextmanager
def ignore_warnings(filters: Sequence[dict]) -> Iterator[None]:
    """Ignore the warnings matching ``filters`` (:func:`warnings.filterwarnings` arguments)."""
    with warnings.catch_warnings():
        for kwargs in filters:
            warnings.filterwarnings("ignore", **kwargs)
        yield


@contextmanager
def quiet_training() -> Iterator[None]:
    """Hide Lightning's hints and two warnings that do not concern a user of ``train``."""
    with ExitStack() as stack:
        stack.enter_context(hide_log_lines(*_LIGHTNING_HINTS))
        stack.enter_context(hide_log_lines(*_LIGHTNING_DEVICES))
        stack.enter_context(ignore_warnings(_TRAINING_WARNINGS))
        yield


@contextmanager
def quiet_setup() -> Iterator[None]:
    """Hide scvi-tools' INFO line about naming the registered coordinates' columns."""
    with hide_log_lines(*_SETUP_LINES):
        yield


@contextmanager
def quiet_squidpy_import() -> Iterator[None]:
    """Hide docrep's SyntaxWarnings about squidpy's docstrings, raised on ``import squidpy``."""
    with ignore_warnings(_SQUIDPY_IMPORT_WARNINGS):
        yield


class PlainScriptHandler(logging.Handler):
    """Show the package's log lines on ``sys.stderr`` when nothing else would.

    Installed on the ``cellplm_scvi`` logger (as scvi-tools gives its logger a handler), so
    warnings such as ``setup_anndata`` recomputing a tissue column reach a plain script. It
    stays silent once the root logger has a handler (``logging.basicConfig``, pytest): the
    record then reaches that handler by propagation, and is not shown twice.
    """

    def __init__(self, level: int = logging.INFO):
        super().__init__(level)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        try:
            sys.stderr.write(self.format(record) + "\n")  # the current stderr (redirections)
        except Exception:  # logging must never raise
            self.handleError(record)


def install_package_handler() -> None:
    """Give the package logger its :class:`PlainScriptHandler` (once) and the INFO level, so
    its own lines show in a plain script; ``logging.getLogger("cellplm_scvi").setLevel(
    logging.WARNING)`` keeps only its warnings."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    if not any(isinstance(h, PlainScriptHandler) for h in logger.handlers):
        logger.addHandler(PlainScriptHandler())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
