"""Kaggle submission (paper Section 5): predict the unlabeled test file, write ID,Labels, validated and atomically.
Kaggle accuracy on the hidden set is not CIFAR-10 test accuracy: never report one as the other."""
import csv
import io
from pathlib import Path

import numpy as np
import pandas as pd

from ..data import channel_stats, load_unlabeled, split_data
from ..device import resolve_device
from ..errors import DataError
from ..infer import strategy_probs
from ..io import atomic_write_text
from ..rundir import load_run_models


def _read(source, path) -> pd.DataFrame:
    try:
        return pd.read_csv(source, dtype={"ID": str}, keep_default_na=False)   # an id "NA" stays "NA"
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"cannot read submission {path}: {e}") from None


def _check(frame: pd.DataFrame, path, ids, num_classes) -> dict:
    """The submission's rows as read back from CSV, checked; DataError on the first problem."""
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
    return {"rows": len(frame), "class_counts": np.bincount(labels.astype(int), minlength=num_classes).tolist()}


def write_submission(ids, labels, path, num_classes=10) -> dict:
    """Write the Kaggle CSV (ID,Labels), validated in memory first: a bad one leaves `path` as it was."""
    ids, labels = np.asarray(ids), np.asarray(labels)
    if len(ids) != len(labels):
        raise DataError(f"{len(ids)} ids but {len(labels)} predictions")
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([("ID", "Labels"), *zip(ids.tolist(), labels.astype(int).tolist())])
    summary = _check(_read(io.StringIO(buf.getvalue()), path), path, ids, num_classes)
    atomic_write_text(path, buf.getvalue())
    return summary


def validate_submission(path, ids=None, num_classes=10) -> dict:
    """Check a submission CSV; raise DataError naming the first problem, else return a summary."""
    return _check(_read(path, path), path, ids, num_classes)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and a.samefile(b))
    except (OSError, RuntimeError):      # RuntimeError: a symlink loop (Python < 3.13)
        return False


def predict_file(run_dir, input_path, output, strategy="ensemble+tta", device=None) -> dict:
    """Predict a Kaggle-format file with a finished run and write the submission (`samlib submit`)."""
    output = Path(output)
    if _same_file(Path(input_path), output):
        raise DataError(f"--output {output} is the input file {input_path}; writing there would "
                        "overwrite the competition's data: choose another name (e.g. submission.csv)")
    device = resolve_device(device)
    images, ids = load_unlabeled(input_path)
    regular, ema = load_run_models(run_dir, device)
    probs = strategy_probs(regular, ema, images, strategy, device)
    if not bool(probs.isfinite().all()):          # argmax would write a guess (class 0) for each
        raise DataError(f"the {strategy} predictions of {run_dir} for {input_path} are not all finite "
                        f"(NaN or inf), so nothing was written to {output}: check the input file, or "
                        "evaluate the run (python -m samlib evaluate) and train it again if it diverged")
    return write_submission(ids, probs.argmax(1).numpy(), output)


def kaggle_preview(p, train_mean, train_std) -> None:
    """Notebook 00: the Kaggle file's size, ids, channel statistics (beside the training images') and first images."""
    if p.kaggle_file is None:
        print("kaggle_file not given: no preview (pass -p kaggle_file PATH, or make report KAGGLE_FILE=PATH)")
        return
    from IPython.display import display

    from .figures import sample_grid

    images, ids = load_unlabeled(p.kaggle_file)
    mean, std = channel_stats(images)
    print(f"{p.kaggle_file}: {len(ids)} images {images.shape[1:]} {images.dtype}, ids {ids[0]} .. {ids[-1]}")
    display(pd.DataFrame({"channel": ["red", "green", "blue"], "mean (Kaggle)": mean, "mean (train)": train_mean,
                          "std (Kaggle)": std, "std (train)": train_std}).round(4))
    display(sample_grid(images, names=ids, title="Kaggle unlabeled images (first 40)", per_class=8,
                        caption=p.caption, save=p.results / "kaggle_samples.png"))


def report_submission(p, dataset) -> dict:
    """Notebook 03: `final` (first seed) predicts p.kaggle_file, else the CIFAR-10 test images (ids 0..N-1: not a
    submission, of known accuracy), with p.strategy ("best": 02's pick) into submission.csv; summary.json's part."""
    from .runs import evaluate_run, finished_runs, load_run, run_probs
    from .tables import best_strategy

    run_dir = finished_runs("final", p.profile, p.seeds[:1], p.runs, needed_by="notebook 03")[p.seeds[0]]
    strategy = p.strategy
    if strategy == "best":
        strategy = best_strategy(evaluate_run(run_dir, dataset=dataset, device=p.device))
    print(f"run {run_dir.name}, strategy {strategy}")
    if p.kaggle_file:
        images, ids = load_unlabeled(p.kaggle_file)
        labels, source = None, f"Kaggle-format file {Path(p.kaggle_file).name}"
        print(f"predicting the Kaggle file {p.kaggle_file}: {len(ids)} images (its Kaggle score comes from "
              "uploading the file; it is not CIFAR-10 test accuracy)")
    else:
        images, labels = split_data(load_run(run_dir)["config"], dataset)["test"]
        ids, source = np.arange(len(labels)), f"CIFAR-10 test images ({p.profile} profile)"
        print(f"kaggle_file not given: exporting predictions for the {len(ids)} CIFAR-10 test images of the "
              f"{p.profile} profile (ids 0..{len(ids) - 1}). This file is NOT a Kaggle submission.")
    pred = run_probs(run_dir, strategy, images, labels, p.device).argmax(1).numpy()   # 02's cache for the test set
    check = write_submission(ids, pred, p.results / "submission.csv")
    print(f"wrote {p.results / 'submission.csv'}: {check['rows']} rows, header ID,Labels, ids unique, labels in 0..9")
    accuracy = None if labels is None else float((pred == labels).mean())
    if accuracy is not None:
        print(f"CIFAR-10 test accuracy of these predictions ({p.profile} profile, {strategy}): "
              f"{100 * accuracy:.2f}% - a CIFAR-10 number, not a Kaggle score")
    return {"file": "submission.csv", "source": source, "strategy": strategy, "run": run_dir.name, **check,
            "cifar10_test_accuracy": accuracy}
