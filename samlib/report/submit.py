"""Kaggle submission (paper Section 5): predict the unlabeled test file, write ID,Labels.

The competition's file (cifar_test_nolabel.pkl) is read with the restricted unpickler of
samlib.data; the CSV is written atomically and validated (header, one row per id, unique
ids, labels 0-9) before anyone uploads it.  Kaggle accuracy on that hidden set is not
CIFAR-10 test accuracy: never report one as the other.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..data import load_unlabeled
from ..device import resolve_device
from ..errors import DataError
from ..infer import strategy_probs
from ..io import atomic_write_text
from ..rundir import load_run_models


def _csv_text(ids, labels) -> str:
    ids, labels = np.asarray(ids), np.asarray(labels)
    if len(ids) != len(labels):
        raise DataError(f"{len(ids)} ids but {len(labels)} predictions")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["ID", "Labels"])
    writer.writerows(zip(ids.tolist(), labels.astype(int).tolist()))
    return buf.getvalue()


def write_submission(ids, labels, path, num_classes=10) -> Path:
    """Write the Kaggle CSV: header ID,Labels, one row per id, atomically.

    The rows are validated in memory first (the checks of `validate_submission`): a
    submission that would fail them raises DataError and is never written, and a previous
    file at `path` stays as it was."""
    text = _csv_text(ids, labels)
    _check(_read(io.StringIO(text), path), path, ids, num_classes)
    return atomic_write_text(path, text)


def _read(source, path) -> pd.DataFrame:
    try:
        return pd.read_csv(source, dtype={"ID": str}, keep_default_na=False)   # an id "NA" stays "NA"
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"cannot read submission {path}: {e}") from None


def _check(frame: pd.DataFrame, path, ids, num_classes) -> dict:
    """The submission's checks on its rows (as read back from CSV); DataError on the first problem."""
    if list(frame.columns) != ["ID", "Labels"]:
        raise DataError(f"{path}: header must be ID,Labels, found {','.join(map(str, frame.columns))}")
    if frame["ID"].duplicated().any():
        raise DataError(f"{path}: duplicate id {frame['ID'][frame['ID'].duplicated()].iloc[0]}")
    labels = pd.to_numeric(frame["Labels"], errors="coerce")
    if labels.isna().any() or (labels % 1 != 0).any() or labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"{path}: labels must be integers 0..{num_classes - 1}")
    if ids is not None:
        expected = pd.Series(np.asarray(ids)).astype(str)
        if len(frame) != len(expected) or set(frame["ID"]) != set(expected):
            raise DataError(f"{path}: {len(frame)} rows do not match the {len(expected)} ids of the input file")
    counts = np.bincount(labels.astype(int), minlength=num_classes)
    return {"rows": len(frame), "class_counts": counts.tolist()}


def validate_submission(path, ids=None, num_classes=10) -> dict:
    """Check a submission CSV; raise DataError naming the first problem, else return a summary."""
    return _check(_read(path, path), path, ids, num_classes)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except (OSError, RuntimeError):      # RuntimeError: a symlink loop (Python < 3.13)
        return False


def predict_file(run_dir, input_path, output, strategy="ensemble+tta", device=None) -> dict:
    """Predict a Kaggle-format unlabeled file with a finished run and write the submission.

    The output may not be the input file (nor a folder); the rows are validated before the
    CSV is written, so an invalid submission never reaches the disk."""
    output = Path(output)
    if _same_file(Path(input_path), output):
        raise DataError(f"--output {output} is the input file {input_path}; writing there would "
                        "overwrite the competition's data: choose another name (e.g. submission.csv)")
    if output.is_dir():
        raise DataError(f"--output {output} is a folder; give a file name instead "
                        f"(e.g. {output / 'submission.csv'})")
    device = resolve_device(device)
    images, ids = load_unlabeled(input_path)
    regular, ema = load_run_models(run_dir, device)
    probs = strategy_probs(regular, ema, images, strategy, device)
    if not bool(probs.isfinite().all()):          # argmax would write a guess (class 0) for each
        raise DataError(f"the {strategy} predictions of {run_dir} for {input_path} are not all finite "
                        f"(NaN or inf), so nothing was written to {output}: check the input file, or "
                        "evaluate the run (python -m samlib evaluate) and train it again if it diverged")
    labels = probs.argmax(1).numpy()
    text = _csv_text(ids, labels)
    summary = _check(_read(io.StringIO(text), output), output, ids, 10)
    atomic_write_text(output, text)
    return summary
