"""What the notebooks compute: train the Table 1 runs, rebuild Table 1 and Figure 1's table.

The notebooks narrate and plot; every number they show comes from here, with the paper's
value beside it and the profile, data source and device named (paper Table 1, Figure 1).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from . import data as D
from .config import from_dict, resolve
from .infer import evaluate_strategies
from .errors import SamlibError
from .io import atomic_write_text, load_checkpoint, read_json, save_checkpoint
from .model import build_model, count_parameters
from .submit import load_run_models
from .train import resolve_device, split_data, train

# Paper Table 1 (CIFAR-10; percent) and its parameter column, as printed.
PAPER_TABLE1 = pd.DataFrame([
    ("baseline", "Baseline ResNet", 99.82, 91.43, "4.96M"),
    ("se", "+ SE blocks", 99.75, 92.05, "5.02M"),
    ("se_mixup", "+ MixUp (a=0.3)", 67.41, 92.74, "5.02M"),
    ("final", "+ EMA (final)", 67.59, 92.99, "5.02M"),
], columns=["config", "paper_row", "paper_train_acc", "paper_test_acc", "paper_params"])

# Figure 1's claims as stated in the text: TTA +0.31 points over standard inference,
# the regular/EMA ensemble a further +0.16, final 92.99%.
PAPER_FIGURE1 = {"tta_gain": 0.31, "ensemble_gain": 0.16, "final": 92.99}


def load_run(run_dir) -> dict:
    """Everything a finished (or unfinished) run directory holds, as Python objects."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise SamlibError(f"{run_dir} is not a samlib run directory (no config.json); pass the "
                          "folder that `python -m samlib train` printed")
    out = {"dir": run_dir, "config": from_dict(read_json(run_dir / "config.json"))}
    for name in ("final", "provenance", "run"):
        path = run_dir / f"{name}.json"
        out[name] = read_json(path) if path.exists() else None
    metrics = run_dir / "metrics.csv"
    out["metrics"] = pd.read_csv(metrics) if metrics.exists() else pd.DataFrame()
    return out


def train_many(configs, profile, seeds, data_dir=None, dataset=None, out="runs", device=None,
               progress=True, **overrides) -> dict:
    """Train (or reuse) every config x seed; returns {config: [run_dir, ...]}."""
    return {name: [train(resolve(name, profile, seed=seed, **overrides), data_dir=data_dir,
                         dataset=dataset, out=out, device=device, profile=profile, progress=progress)
                   for seed in seeds]
            for name in configs}


def _mean_sd(values) -> tuple:
    s = pd.Series(values, dtype=float)
    return s.mean(), (s.std(ddof=1) if len(s) > 1 else float("nan"))


def table1(runs: dict) -> pd.DataFrame:
    """Table 1 rebuilt: paper column, reproduced mean and sd over seeds, delta, parameters.

    Test accuracy is the selected checkpoint's on the full test set: the EMA model for
    configs with EMA (the paper's "final"), the regular model otherwise.  Train accuracy is
    shown both ways: lambda-weighted on mixed batches (what the paper reports) and clean.
    """
    rows = []
    for name, dirs in runs.items():
        loaded = [load_run(d) for d in dirs]
        cfg = loaded[0]["config"]
        key = "test_acc_ema" if cfg.ema else "test_acc_regular"
        test = _mean_sd([100 * r["final"][key] for r in loaded])
        mixed = _mean_sd([100 * r["final"]["train_acc_mixed"] for r in loaded])
        clean = _mean_sd([100 * r["final"]["train_acc_clean"] for r in loaded])
        rows.append({"config": name, "seeds": len(loaded),
                     "train_acc_mixed": mixed[0], "train_acc_clean": clean[0],
                     "test_acc": test[0], "test_acc_sd": test[1],
                     "params_profile": count_parameters(build_model(se=cfg.se, widths=cfg.widths,
                                                                    blocks=cfg.blocks)),
                     "params_paper_width": count_parameters(build_model(se=cfg.se))})
    table = PAPER_TABLE1.merge(pd.DataFrame(rows), on="config", how="right")
    table["delta_test"] = table["test_acc"] - table["paper_test_acc"]
    return table


def discrepancy_table(reference: list, variants: dict) -> pd.DataFrame:
    """Effect of each paper/code switch: test accuracy of `final+switch` minus `final` (same seeds)."""
    def acc(dirs):
        return _mean_sd([100 * load_run(d)["final"]["test_acc_ema"] for d in dirs])

    base = acc(reference)[0]
    rows = [{"switch": name, "test_acc": m, "test_acc_sd": sd, "delta_vs_final": m - base}
            for name, (m, sd) in ((n, acc(d)) for n, d in variants.items())]
    return pd.DataFrame([{"switch": "final (code as run)", "test_acc": base, "test_acc_sd": float("nan"),
                          "delta_vs_final": 0.0}] + rows)


def evaluate_run(run_dir, data_dir=None, dataset=None, device=None, reuse=True) -> pd.DataFrame:
    """Figure 1's strategy table for one run (cached in strategies.csv)."""
    run_dir = Path(run_dir)
    cfg = load_run(run_dir)["config"]
    if device is not None:
        device = resolve_device(device)
    cached, final = run_dir / "strategies.csv", run_dir / "final.json"
    if reuse and cached.exists() and final.exists() and cached.stat().st_mtime >= final.stat().st_mtime:
        return pd.read_csv(cached)
    if dataset is None:
        dataset = D.load_cifar10(data_dir)
    splits = split_data(cfg, dataset)
    regular, ema = load_run_models(run_dir, device or "cpu")
    table, probs = evaluate_strategies(regular, ema, splits["val"], splits["test"], device=device,
                                       batch_size=cfg.eval_batch_size, return_probs=True)
    # Test probabilities of every row, for the reliability diagram, the confusion matrix and
    # the submission: computed once here, never again.
    save_checkpoint({"probs": probs, "labels": torch.as_tensor(splits["test"][1])},
                    run_dir / "strategy_probs.pt", keep_previous=False)
    atomic_write_text(cached, table.to_csv(index=False))
    return table


def strategy_test_probs(run_dir, strategy: str):
    """(test probabilities (N, classes), labels) of one row of evaluate_run's table, or None."""
    path = Path(run_dir) / "strategy_probs.pt"
    if not path.exists():
        return None
    saved = load_checkpoint(path, fallback=False)
    probs = saved["probs"].get(strategy)
    return None if probs is None else (probs, saved["labels"])
