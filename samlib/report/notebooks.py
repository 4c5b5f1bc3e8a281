"""Notebook upkeep: strip outputs except the checked cells, write the HTML index, write a
small Kaggle-format file for tests.  `python -m samlib.report.notebooks -h`.
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np

from .. import data as D
from .html import write_index

CHECK_MARK = "NBVAL_CHECK_OUTPUT"


def strip_outputs(path) -> int:
    """Clear outputs and execution counts except in `# NBVAL_CHECK_OUTPUT` cells (whose
    outputs nbval compares; they are numbered 1, 2, ...); drop papermill metadata.
    Returns the number of cells kept."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    kept = 0
    nb.metadata.pop("papermill", None)
    nb.metadata["language_info"] = {"name": "python", "pygments_lexer": "ipython3"}
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        if CHECK_MARK not in cell.source:
            cell.outputs, cell.execution_count = [], None
            continue
        kept += 1      # nbval needs an execution count on a cell whose outputs it compares
        cell.execution_count = kept
        for out in cell.outputs:
            if out.get("output_type") == "execute_result":
                out["execution_count"] = kept
            if "metadata" in out:
                out["metadata"] = {}
    nbformat.write(nb, str(path))
    return kept


def write_kaggle_sample(data_dir, out, n=200) -> Path:
    """A Kaggle-format file (dict b'data' uint8 (n, 32, 32, 3), b'ids') from the first n test
    images of data_dir, for exercising the submission path in tests."""
    ds = D.load_cifar10(data_dir)
    n = min(n, len(ds.test_labels))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(pickle.dumps({b"data": np.ascontiguousarray(ds.test_images[:n]),
                                  b"ids": np.arange(1000, 1000 + n)}, protocol=4))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m samlib.report.notebooks", description="notebook upkeep")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("strip", help=f"clear outputs except # {CHECK_MARK} cells")
    s.add_argument("notebooks", nargs="+")
    i = sub.add_parser("index", help="write RESULTS/html/index.html")
    i.add_argument("results")
    k = sub.add_parser("kaggle-sample", help="write a small Kaggle-format test file")
    k.add_argument("data_dir")
    k.add_argument("out")
    k.add_argument("--n", type=int, default=200)
    args = ap.parse_args(argv)
    if args.cmd == "strip":
        for nb in args.notebooks:
            print(f"{nb}: kept outputs of {strip_outputs(nb)} checked cell(s)")
    elif args.cmd == "index":
        print(write_index(args.results))
    else:
        print(write_kaggle_sample(args.data_dir, args.out, args.n))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
