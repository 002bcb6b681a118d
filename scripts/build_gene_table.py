"""Build the vendored gene resources in ``cellplm_scvi/resources/``.

Writes two files:

``gencode_v44_symbols.tsv.gz``
    ``ensembl_id<TAB>symbol`` rows from celltypist's ``GENCODEv44_Gene_id2name.csv`` (GENCODE
    release 44), restricted to the Ensembl IDs (version stripped) of the CellPLM vocabulary, in
    the CSV's row order.
``20230926_85M.config.json.gz``
    The official CellPLM model config, gzipped byte for byte.

Both files are written with a fixed gzip header (no file name, mtime 0), so re-running the
script on the same inputs gives byte-identical output.

Usage::

    pip download celltypist==1.7.1 --no-deps -d /tmp/ct
    python scripts/build_gene_table.py \
        --celltypist-wheel /tmp/ct/celltypist-1.7.1-py3-none-any.whl \
        --config /work/shared/data/20230926_85M.config.json

``--gencode-csv PATH`` may be given instead of ``--celltypist-wheel`` to read an extracted CSV.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import re
import zipfile
from pathlib import Path

CSV_IN_WHEEL = "celltypist/data/samples/GENCODEv44_Gene_id2name.csv"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "cellplm_scvi" / "resources"
_VERSION = re.compile(r"\.\d+$")


def _write_gz(path: Path, data: bytes) -> None:
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz,
    ):
        gz.write(data)


def _read_csv_text(wheel: Path | None, csv_path: Path | None) -> str:
    if wheel is not None:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(CSV_IN_WHEEL).decode("utf-8")
    assert csv_path is not None
    return csv_path.read_text(encoding="utf-8")


def build(config_path: Path, csv_text: str, out_dir: Path) -> tuple[Path, Path]:
    """Write both resources into ``out_dir`` and return their paths."""
    config_bytes = config_path.read_bytes()
    vocab = json.loads(config_bytes)["gene_list"]
    vocab_set = set(vocab)
    if len(vocab_set) != len(vocab):
        raise ValueError("gene_list in the config has duplicates")

    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    for rec in csv.reader(io.StringIO(csv_text)):
        if len(rec) != 2:
            raise ValueError(f"expected 2 columns (id,name) in the GENCODE CSV, got {rec!r}")
        ens, sym = _VERSION.sub("", rec[0].strip()), rec[1].strip()
        if ens in vocab_set and ens not in seen:
            rows.append((ens, sym))
            seen.add(ens)
    missing = vocab_set - seen
    if missing:
        raise ValueError(f"{len(missing)} vocabulary IDs are not in the GENCODE CSV")

    out_dir.mkdir(parents=True, exist_ok=True)
    table = "ensembl_id\tsymbol\n" + "".join(f"{e}\t{s}\n" for e, s in rows)
    table_path = out_dir / "gencode_v44_symbols.tsv.gz"
    config_out = out_dir / f"{config_path.name}.gz"
    _write_gz(table_path, table.encode("utf-8"))
    _write_gz(config_out, config_bytes)
    print(f"wrote {table_path} ({len(rows)} rows, {table_path.stat().st_size} bytes)")
    print(f"wrote {config_out} ({config_out.stat().st_size} bytes)")
    return table_path, config_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--celltypist-wheel", type=Path, help="celltypist wheel holding the CSV")
    src.add_argument("--gencode-csv", type=Path, help="GENCODEv44_Gene_id2name.csv")
    parser.add_argument("--config", type=Path, required=True, help="20230926_85M.config.json")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args()
    build(args.config, _read_csv_text(args.celltypist_wheel, args.gencode_csv), args.out)


if __name__ == "__main__":
    main()
