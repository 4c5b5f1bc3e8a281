"""The reference outputs of `# NBVAL_CHECK_OUTPUT` cells survive a commit of a notebook whose
run was partial, interrupted or failed.  A check cell's complete output (it ran, printed, no
error, the run not interrupted) replaces the reference; any other keeps the one in git's HEAD,
matched by the cell's source.  Imports stay light: `clean` runs in every `git status`.
"""
from __future__ import annotations

import copy
import subprocess
from pathlib import Path

from .notebooks import CHECK_MARK


class MissingReference(ValueError):
    """A check cell has no complete output and HEAD holds no reference for it (one-line message)."""


def _check_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code" and CHECK_MARK in c.source]


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
    for cell in _check_cells(head) if head is not None else ():
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
