"""The runs behind the report: train (or reuse) them, read them back, say at what scale and precision they
trained, and evaluate a run's inference strategies once, cached in its run directory."""
import contextlib
import csv
import hashlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import data as D
from ..config import SWITCHES, TABLE1, from_dict, resolve
from ..device import PRECISIONS, precision_for, resolve_device, runs_natively
from ..errors import DataError, SamlibError
from ..infer import STRATEGIES, evaluate_strategies, strategy_probs
from ..io import (JSON_FIX, atomic_write_text, check_fields, load_checkpoint, present, read_bytes, read_json,
                  save_checkpoint, write_json)
from ..plan import estimate, format_plan, plan_runs
from ..run import train
from ..rundir import METRIC_FIELDS, RunDir, describe_device, load_run_models

CACHE_VERSION = 3   # the strategy cache's format; a cache of another version is recomputed

# What the report reads from a run's files: a field of another kind is a DataError naming it.
_FINAL = {"train_acc_mixed": "number", "train_acc_clean": "number", "test_acc_regular": "number"}
_FINAL_OPTIONAL = {"test_size": "int", "epochs": "int", "best": "object", "test_acc_ema": "number"}
_RUN_OPTIONAL = {"data": "text", "profile": "text|null", "config": "text", "seed": "int", "hash": "text"}
_METRIC_COLUMNS = ("epoch", "lr", "train_loss", "val_acc", "val_acc_ema", "test_acc", "test_acc_ema")


def _read_metrics(path, fix) -> pd.DataFrame:
    """metrics.csv as a DataFrame: parseable, with the columns the figures draw, all numeric."""
    try:
        frame = pd.read_csv(io.StringIO(read_bytes(path, DataError, fix).decode("utf-8")))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); {fix}") from None
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, csv.Error) as e:
        raise DataError(f"{path} cannot be parsed as CSV ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); {fix}") from None
    missing = [c for c in _METRIC_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: column(s) {missing} are missing (header: "
                        f"{','.join(map(str, frame.columns))[:200]}); {fix}")
    for column in frame.columns:
        if column in METRIC_FIELDS and not (pd.api.types.is_numeric_dtype(frame[column])
                                            and not pd.api.types.is_bool_dtype(frame[column])):
            raise DataError(f"{path}: column '{column}' must hold numbers, found e.g. "
                            f"{frame[column].dropna().astype(str).iloc[:1].tolist()}; {fix}")
    return frame


def load_run(run_dir) -> dict:
    """Everything a (finished or not) run directory holds; a damaged file is a DataError / ConfigError naming it."""
    run_dir = Path(run_dir)
    fix = f"the run folder is damaged: move {run_dir} away (or delete it) and train the run again"
    config = run_dir / "config.json"
    if not present(config):
        raise SamlibError(f"{run_dir} is not a samlib run directory (no config.json); pass the "
                          "folder that `python -m samlib train` printed")
    out = {"dir": run_dir, "config": from_dict(read_json(config, fix=fix), source=str(config))}
    final = dict(_FINAL, test_acc_ema="number") if out["config"].ema else _FINAL
    fields = {"final": (final, _FINAL_OPTIONAL), "provenance": ({}, {"train_seconds": "number"}),
              "run": ({}, _RUN_OPTIONAL)}
    for name, (required, optional) in fields.items():
        path = run_dir / f"{name}.json"
        out[name] = (check_fields(read_json(path, fix=fix), path, required, optional, fix)
                     if present(path) else None)
    metrics = run_dir / "metrics.csv"
    out["metrics"] = _read_metrics(metrics, fix) if present(metrics) else pd.DataFrame()
    return out


def train_many(configs, profile, seeds, data_dir=None, dataset=None, out="runs", device=None,
               progress=True, **overrides) -> dict:
    """Train (or reuse) every config x seed -> {config: [run_dir, ...]}; `seeds`: a list or {config: seeds}."""
    plan = plan_runs(configs, seeds, profile, out, **overrides)
    if progress:
        estimate(plan, profile, device, say=lambda line: print(line, flush=True), **overrides)
        print(format_plan(plan, describe_device(resolve_device(device))), flush=True)
    runs = {name: [] for name in configs}
    for i, item in enumerate(plan):
        later = sum(p.seconds for p in plan[i + 1:]) if progress else 0.0
        runs[item.config].append(train(resolve(item.config, profile, seed=item.seed, **overrides),
                                       data_dir=data_dir, dataset=dataset, out=out, device=device,
                                       profile=profile, progress=progress, later_seconds=later))
    return runs


def finished_runs(config: str, profile: str, seeds, out, needed_by: str) -> dict:
    """{seed: finished run directory} of `config` at `profile`; never trains (names the notebook that does)."""
    runs = {seed: RunDir.for_config(resolve(config, profile, seed=seed), out) for seed in seeds}
    for seed, run in runs.items():
        if not run.finished:
            state = "is not finished" if (run / "config.json").exists() else "does not exist"
            raise SamlibError(f"{needed_by} needs the finished {config!r} run ({profile} profile, seed {seed}); "
                              f"{run.path} {state}: run notebook 01_table1_ablation (or make report) first")
    return {seed: run.path for seed, run in runs.items()}


def ablation_seeds(switches, seeds, final_seeds) -> dict:
    """{config: seeds} of notebook 01: Table 1's configs and `final+switch` at `seeds`, `final` at `final_seeds`."""
    return {**dict.fromkeys(TABLE1, seeds), **{f"final+{s}={SWITCHES[s]}": seeds for s in switches},
            "final": final_seeds}


def split_runs(runs: dict, switches) -> tuple:
    """Notebook 01's runs as (Table 1's {config: run dirs}, {"switch=value": run dirs})."""
    return ({name: runs[name] for name in TABLE1},
            {f"{s}={SWITCHES[s]}": runs[f"final+{s}={SWITCHES[s]}"] for s in switches})


def precisions(loaded) -> str:
    """The precisions loaded runs trained in (provenance.json), e.g. "fp32" or "bf16, fp32"."""
    return ", ".join(sorted({str((r["provenance"] or {}).get("precision") or "unrecorded") for r in loaded}))


def trained_precisions(runs) -> str:
    """The precisions `runs` ({config: [run_dir, ...]} or run dirs) trained in: the figures' captions."""
    dirs = [d for group in runs.values() for d in group] if isinstance(runs, dict) else runs
    return precisions([load_run(d) for d in dirs])


def run_scale(runs: dict, dataset) -> pd.DataFrame:
    """The index page's scale table: per config of `runs`, its seeds, precisions, images, epochs, widths, time."""
    rows = []
    for name, dirs in runs.items():
        loaded = [load_run(d) for d in dirs]
        cfg = loaded[0]["config"]
        images = min(cfg.train_subset or len(dataset.train_labels), len(dataset.train_labels)) - cfg.val_size
        rows.append({"config": name, "seeds": [r["config"].seed for r in loaded], "trained_in": precisions(loaded),
                     "training_images": images, "epochs": cfg.epochs, "widths": list(cfg.widths),
                     "train_seconds": sum(_train_seconds(r) for r in loaded)})
    return pd.DataFrame(rows)


def _train_seconds(run: dict) -> float:
    """provenance.json's training time, else the sum of metrics.csv's epoch seconds."""
    recorded = (run["provenance"] or {}).get("train_seconds")
    return float(recorded if recorded is not None else run["metrics"].get("seconds", pd.Series(dtype=float)).sum())


def _run_state(run_dir: Path) -> dict:
    """What an evaluation is computed from: finished or not, the selected checkpoints' sha256 (None: absent)."""
    state = {"finished": present(run_dir / "final.json")}
    for name in ("best_regular.pt", "best_ema.pt"):
        try:
            state[name] = hashlib.sha256((run_dir / name).read_bytes()).hexdigest()
        except FileNotFoundError:
            state[name] = None
        except OSError:               # its reader says why
            state[name] = "unreadable"
    return state


def _cached_table(cached: Path, meta: Path, key: dict):
    """The cached table when intact and made for `key`, else None.  The key file holds the table's sha256, so a
    table of another evaluation (one killed before its key, or a concurrent one) is never served."""
    try:
        text = read_bytes(cached, DataError, JSON_FIX)
        if read_json(meta) != dict(key, table_sha256=hashlib.sha256(text).hexdigest()):
            return None
        table = pd.read_csv(io.BytesIO(text))
    except (SamlibError, OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None
    columns = {"strategy", "temperature", "temperature_from", "selected", "test_images", "test_accuracy", "test_nll",
               "test_ece", "val_accuracy"}
    return table if columns <= set(table.columns) and len(table) else None


def inference_precision(run: dict, device=None) -> str:
    """The precision a run is evaluated in: its training's where this device runs it natively, else its amp's."""
    device = resolve_device(device)                  # a str too; default: the GPU when there is one
    trained = (run.get("provenance") or {}).get("precision")
    if isinstance(trained, str) and trained in PRECISIONS and runs_natively(trained, device):
        return trained
    return precision_for(run["config"].amp, device)


def evaluate_run(run_dir, data_dir=None, dataset=None, device=None, reuse=True,
                 allow_other_data: bool = False) -> pd.DataFrame:
    """Figure 1's strategy table for one run, on the run's own data unless `allow_other_data`; cached in the run."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    cfg = run["config"]
    if dataset is None:
        dataset = D.load_cifar10(data_dir)
    data_id = D.fingerprint(dataset)
    trained_on = (run["run"] or {}).get("data")
    if trained_on not in (None, data_id) and not allow_other_data:
        raise SamlibError(f"{run_dir} was trained on other data (fingerprint {trained_on}) than "
                          f"{data_dir or 'the data given'} (fingerprint {data_id}); pass the run's own "
                          "data, or --allow-other-data to evaluate it on this data anyway")
    device = resolve_device(device)                  # default: the GPU when there is one
    precision = inference_precision(run, device)
    key = {"version": CACHE_VERSION, "data": data_id, "strategies": list(STRATEGIES), "precision": precision,
           "run": _run_state(run_dir)}
    cached, meta = run_dir / "strategies.csv", run_dir / "strategies.json"
    table = _cached_table(cached, meta, key) if reuse else None    # None: absent, damaged or another key's
    if table is not None:
        return table
    splits = D.split_data(cfg, dataset)
    regular, ema = load_run_models(run_dir, device)
    rows, probs, selected_on = evaluate_strategies(regular, ema, splits["val"], splits["test"], device=device,
                                                   batch_size=cfg.eval_batch_size, precision=precision)
    table = pd.DataFrame(rows)
    table.attrs["selected_on"] = selected_on
    # The key goes first and comes back last, with the table's sha256; the probabilities serve figures and submission.
    with contextlib.suppress(OSError):      # e.g. a folder in its place: write_json below says so
        meta.unlink(missing_ok=True)
    save_checkpoint({"key": key, "probs": probs, "labels": torch.as_tensor(splits["test"][1])},
                    run_dir / "strategy_probs.pt", keep_previous=False)
    text = table.to_csv(index=False)
    atomic_write_text(cached, text)
    write_json(meta, dict(key, table_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest()))
    return table


def saved_test_probs(run_dir) -> tuple:
    """({strategy: test probabilities}, labels) evaluate_run saved for the run as it is now, or Nones."""
    run_dir = Path(run_dir)
    path = run_dir / "strategy_probs.pt"
    if not path.exists():
        return None, None
    try:
        key = read_json(run_dir / "strategies.json")
        key.pop("table_sha256", None)
        if key.get("run") != _run_state(run_dir):
            return None, None
        saved = load_checkpoint(path, fallback=False)
        probs, labels, fits = saved["probs"], saved["labels"].numpy(), saved.get("key") == key
    except (SamlibError, KeyError, TypeError, AttributeError):   # damaged: evaluate_run writes it again
        return None, None
    return (probs, labels) if fits and isinstance(probs, dict) else (None, None)


def run_probs(run_dir, strategy: str, images, labels=None, device=None) -> torch.Tensor:
    """One strategy's class probabilities on `images`: evaluate_run's when `labels` are theirs, else computed."""
    probs, saved_labels = saved_test_probs(run_dir) if labels is not None else (None, None)
    if probs is not None and strategy in probs and np.array_equal(saved_labels, np.asarray(labels)):
        return probs[strategy]
    device = resolve_device(device)
    regular, ema = load_run_models(run_dir, device)
    precision = inference_precision(load_run(run_dir), device)
    return strategy_probs(regular, ema, images, strategy, device=device, precision=precision)


def probs_on_test(run_dir, strategy: str, dataset, device=None) -> tuple:
    """(probabilities, labels) of one strategy of a run on the run's own test split (run_probs)."""
    test_x, test_y = D.split_data(load_run(run_dir)["config"], dataset)["test"]
    return run_probs(run_dir, strategy, test_x, test_y, device), test_y
