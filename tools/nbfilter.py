"""Notebook upkeep (repository tooling, not part of samlib): strip outputs except the checked cells,
also as git's clean filter; keep HEAD's reference outputs of the checked cells when a run was partial;
scrub machine paths from executed reports; write the HTML index and a small Kaggle-format file.
`python tools/nbfilter.py -h`.  Imports stay lazy: git runs `clean` in every `git status`.
"""
from __future__ import annotations

import argparse
import copy
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

CHECK_MARK = "NBVAL_CHECK_OUTPUT"
# The stored notebooks' contract (tests/test_notebooks_env.py), whatever kernel JupyterLab ran.
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
LANGUAGE_INFO = {"name": "python", "pygments_lexer": "ipython3"}
# per-cell metadata that is run or view state, not content (papermill, JupyterLab, extensions)
VOLATILE_CELL_METADATA = ("papermill", "execution", "ExecuteTime", "collapsed", "scrolled")
ROOT = Path(__file__).resolve().parents[1]


def _merge_streams(outputs: list) -> list:
    """Consecutive stream outputs of one name as one, as nbconvert stores them and nbval compares them."""
    merged = []
    for out in outputs:
        if (out.get("output_type") == "stream" and merged and merged[-1].get("output_type") == "stream"
                and merged[-1].get("name") == out.get("name")):
            merged[-1]["text"] = "".join(merged[-1]["text"]) + "".join(out["text"])
        else:
            merged.append(out)
    return merged


def strip_notebook(nb) -> int:
    """In place: clear outputs and execution counts except in check cells (numbered 1, 2, ...
    for nbval), drop run-state metadata, reset kernelspec and language_info.  Returns the
    number of cells kept."""
    kept = 0
    nb.metadata.pop("papermill", None)
    nb.metadata.pop("widgets", None)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = dict(LANGUAGE_INFO)
    for cell in nb.cells:
        for key in VOLATILE_CELL_METADATA:
            cell.metadata.pop(key, None)
        if cell.metadata.get("tags") == []:     # papermill and JupyterLab add empty ones
            del cell.metadata["tags"]
        if cell.cell_type != "code":
            continue
        if CHECK_MARK not in cell.source:
            cell.outputs, cell.execution_count = [], None
            continue
        kept += 1
        cell.execution_count = kept
        cell.outputs = _merge_streams(cell.outputs)
        for out in cell.outputs:
            if out.get("output_type") == "execute_result":
                out["execution_count"] = kept
            if "metadata" in out:
                out["metadata"] = {}
    return kept


def _text(nb) -> str:
    import nbformat

    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


# ---------------------------------------------------------------- reference outputs
# A check cell's complete output (it ran, printed, no error, the run not interrupted) replaces
# the reference; any other keeps the one in git's HEAD, matched by the cell's source.

class MissingReference(ValueError):
    """A check cell has no complete output and HEAD holds no reference for it (one-line message)."""


def _has_error(outputs) -> bool:
    return any(o.get("output_type") == "error" for o in outputs)


def run_interrupted(nb) -> bool:
    """A code cell holds an error output (a failure, or JupyterLab's stop button), or papermill
    recorded an exception."""
    if (nb.metadata.get("papermill") or {}).get("exception"):
        return True
    return any(c.cell_type == "code" and _has_error(c.get("outputs", [])) for c in nb.cells)


def incomplete_reason(cell, interrupted: bool = False) -> str | None:
    """Why `cell`'s output cannot serve as a reference, or None when it can."""
    if not cell.get("outputs"):
        return "no output"
    if _has_error(cell.outputs):
        return "an error output"
    if cell.get("execution_count") is None:
        return "not run"
    return "an interrupted run" if interrupted else None


def head_notebook(path):
    """git HEAD's version of the notebook at `path` (relative to the cwd, as git's %f), or None."""
    import nbformat

    p = Path(path)
    try:
        raw = subprocess.run(["git", "-C", str(p.parent), "show", f"HEAD:./{p.name}"],
                             capture_output=True, check=True, timeout=60).stdout
        return nbformat.reads(raw.decode("utf-8"), as_version=4)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def keep_references(nb, path=None) -> list:
    """In place: each check cell without a complete output gets the complete outputs of the
    same-source check cell (the n-th of identical sources for the n-th) in HEAD's `path`.
    Returns [(cell number from 1, reason)] of the cells that found no reference."""
    interrupted = run_interrupted(nb)
    seen: dict = {}
    todo = []
    for i, cell in enumerate(nb.cells, 1):
        if cell.cell_type == "code" and CHECK_MARK in cell.source:
            n = seen[cell.source] = seen.get(cell.source, -1) + 1
            why = incomplete_reason(cell, interrupted)
            if why:
                todo.append((i, n, cell, why))
    if not todo:
        return []
    head = head_notebook(path) if path else None
    refs: dict = {}
    for cell in head.cells if head is not None else ():
        if cell.cell_type == "code" and CHECK_MARK in cell.source:
            refs.setdefault(cell.source, []).append(None if incomplete_reason(cell) else cell.outputs)
    missing = []
    for i, n, cell, why in todo:
        same = refs.get(cell.source, [])
        ref = same[n] if n < len(same) else None
        if ref is None:
            missing.append((i, why))
        else:
            cell.outputs, cell.execution_count = copy.deepcopy(ref), 1   # strip_notebook renumbers
    return missing


def describe(missing: list) -> str:
    """`keep_references`'s leftovers in a few words: 'cell 3 (no output), cell 7 (...)'."""
    return ", ".join(f"cell {i} ({why})" for i, why in missing)


def strip_outputs(path) -> int:
    """`strip_notebook` on a file, in place; returns the cells kept.  A check cell without a
    complete output keeps HEAD's reference; with none there, MissingReference (one line) and
    the file is left alone."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    missing = keep_references(nb, path)
    if missing:
        raise MissingReference(f"{path}: refused, file left unchanged: # {CHECK_MARK} {describe(missing)} "
                               "and git's HEAD holds no reference output for it; run `make notebook-outputs`")
    kept = strip_notebook(nb)
    nbformat.write(nb, str(path))
    return kept


def clean_stream(src=None, dst=None, path=None) -> int:
    """The git clean filter: a notebook on stdin, stripped, on stdout.  Not notebook JSON (empty,
    merge conflict) passes through.  A check cell without a complete output keeps HEAD's
    reference for `path` (git's %f); with none it never fails (git would then store the notebook
    unstripped): one warning, and the cell's unfinished outputs are stored empty."""
    import nbformat

    raw = (src or sys.stdin.buffer).read()
    dst = dst or sys.stdout.buffer
    try:
        nb = nbformat.reads(raw.decode("utf-8"), as_version=4)
    except ValueError:            # nbformat's NotJSONError, UnicodeDecodeError
        dst.write(raw)
        return 0
    missing = keep_references(nb, path)
    for i, why in missing:
        if why != "an interrupted run":                  # its own output is whole: keep it
            nb.cells[i - 1].outputs = []
    if missing:
        print(f"samlib-strip: {path or '<stdin>'}: # {CHECK_MARK} {describe(missing)}: no reference output "
              "in git's HEAD to keep, unfinished outputs stored empty; run `make notebook-outputs`",
              file=sys.stderr)
    kept = strip_notebook(nb)
    dst.write(_text(nb).encode("utf-8"))
    dst.flush()
    return kept


# ---------------------------------------------------------------- machine paths in executed reports

def path_replacements(paths=(), root=ROOT, home=None) -> dict:
    """This machine's absolute paths -> portable ones: each of `paths` -> relative to `root`
    (its name when outside), `root` -> ".", home -> "~"; given and symlink-resolved forms."""
    def forms(p):
        return dict.fromkeys((os.path.abspath(p), os.path.realpath(p)))

    table = {}
    for p in paths:
        for form in forms(p) if p else ():
            rel = os.path.relpath(os.path.realpath(p), os.path.realpath(root))
            table.setdefault(form, os.path.basename(os.path.realpath(p)) if rel.startswith("..") else rel)
    for old, new in ((root, "."), (home or Path.home(), "~")):
        for form in forms(old):
            table.setdefault(form, new)
    return {old: new for old, new in table.items() if old != os.sep and old != new}


def _walk(obj, sub, counter: list):
    """`obj` with `sub` applied to every string in it (in place); in a `data` bundle only to
    the text mimetypes (base64 images stay)."""
    if isinstance(obj, str):
        new = sub(obj)
        counter[0] += new != obj
        return new
    if isinstance(obj, list):
        obj[:] = [_walk(v, sub, counter) for v in obj]
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k == "data" and isinstance(v, dict):
                for mime in [m for m in v if m.startswith("text/") or m.endswith("json") or m == "image/svg+xml"]:
                    v[mime] = _walk(v[mime], sub, counter)
            else:
                obj[k] = _walk(v, sub, counter)
    return obj


def scrub_paths(notebook_path, replacements: dict) -> int:
    """Apply `replacements` (see path_replacements) to an executed notebook's outputs, metadata
    and parameters cells, in place, so a committed report carries no machine paths.  Longest
    path first, at path boundaries.  Returns the number of strings changed."""
    import nbformat

    from samlib.io import atomic_write_text

    if not replacements:
        return 0
    table = {str(k): str(v) for k, v in replacements.items()}
    olds = sorted(table, key=len, reverse=True)
    pattern = re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, olds)) + r")(?![\w-]|\.\w)")
    sub, counter = (lambda text: pattern.sub(lambda m: table[m.group(1)], text)), [0]
    nb = nbformat.read(str(notebook_path), as_version=4)
    _walk(nb.metadata, sub, counter)
    for cell in nb.cells:
        _walk(cell.metadata, sub, counter)
        if {"parameters", "injected-parameters"} & set(cell.metadata.get("tags", [])):
            cell.source = _walk(cell.source, sub, counter)
        for out in cell.get("outputs", []):
            _walk(out, sub, counter)
    if counter[0]:
        atomic_write_text(notebook_path, _text(nb))
    return counter[0]


def write_kaggle_sample(data_dir, out, n=200) -> Path:
    """A Kaggle-format file (b'data' uint8 (n, 32, 32, 3), b'ids') of the first n test images, for tests."""
    import numpy as np

    from samlib import data as D
    from samlib.io import atomic_write_bytes

    ds = D.load_cifar10(data_dir)
    n = min(n, len(ds.test_labels))
    sample = {b"data": np.ascontiguousarray(ds.test_images[:n]), b"ids": np.arange(1000, 1000 + n)}
    return atomic_write_bytes(out, pickle.dumps(sample, protocol=4))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/nbfilter.py", description="notebook upkeep")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("strip", help=f"clear outputs except # {CHECK_MARK} cells").add_argument("notebooks", nargs="+")
    f = sub.add_parser("clean", help="strip a notebook from stdin to stdout (the git filter: make git-filter)")
    f.add_argument("path", nargs="?", help="its path (git's %%f): where HEAD's reference outputs are read")
    c = sub.add_parser("scrub", help="replace this machine's absolute paths in executed notebooks")
    c.add_argument("notebooks", nargs="+")
    c.add_argument("--paths", nargs="*", default=[], help="data/runs/results folders: made relative to the repo")
    sub.add_parser("index", help="write RESULTS/html/index.html").add_argument("results")
    k = sub.add_parser("kaggle-sample", help="write a small Kaggle-format test file")
    k.add_argument("data_dir")
    k.add_argument("out")
    k.add_argument("--n", type=int, default=200)
    args = ap.parse_args(argv)
    if args.cmd == "strip":
        refused = 0
        for nb in args.notebooks:
            try:
                print(f"{nb}: kept outputs of {strip_outputs(nb)} checked cell(s)")
            except MissingReference as e:
                print(e, file=sys.stderr)
                refused += 1
        return 1 if refused else 0
    if args.cmd == "clean":
        clean_stream(path=args.path)
    elif args.cmd == "scrub":
        table = path_replacements(args.paths)
        for nb in args.notebooks:
            print(f"{nb}: {scrub_paths(nb, table)} string(s) changed")
    elif args.cmd == "index":
        from samlib.report.html import write_index

        print(write_index(args.results))
    else:
        print(write_kaggle_sample(args.data_dir, args.out, args.n))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
