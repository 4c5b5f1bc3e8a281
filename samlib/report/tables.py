"""The report's tables (Table 1, the discrepancy switches, Figure 1's strategies and claims, reliability),
each with the paper's value beside the reproduced one."""
import functools

import numpy as np
import pandas as pd

from ..config import resolve
from ..data import CIFAR_MEAN, STD_AS_RUN, STD_TRUE, channel_stats, split_data
from ..device import resolve_device
from ..errors import SamlibError
from ..infer import calibration_bins, predict_logits
from ..model import build_model, count_parameters
from ..progress import progress_bar
from ..rundir import load_run_models
from .runs import inference_precision, load_run, precisions

# Paper Table 1 (CIFAR-10; percent) and its parameter column, as printed.
PAPER_TABLE1 = pd.DataFrame([
    ("baseline", "Baseline ResNet", 99.82, 91.43, "4.96M"),
    ("se", "+ SE blocks", 99.75, 92.05, "5.02M"),
    ("se_mixup", "+ MixUp (a=0.3)", 67.41, 92.74, "5.02M"),
    ("final", "+ EMA (final)", 67.59, 92.99, "5.02M"),
], columns=["config", "paper_row", "paper_train_acc", "paper_test_acc", "paper_params"])

# Figure 1's claims as the text states them: gains in points, the final accuracy in %.
PAPER_FIGURE1 = {"tta_gain": 0.31, "ensemble_gain": 0.16, "final": 92.99}


def binomial_interval(accuracy: float, n: int, z: float = 1.96) -> tuple:
    """Wilson 95% interval of an accuracy (a fraction) measured on n independent images."""
    if not n:
        return float("nan"), float("nan")
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def paired_bootstrap(correct_a, correct_b, samples: int = 2000, seed: int = 0) -> tuple:
    """Accuracy difference a - b (points) on the same images and its paired 95% bootstrap interval."""
    diff = np.asarray(correct_a, dtype=float) - np.asarray(correct_b, dtype=float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (samples, len(diff)))].mean(axis=1)
    return 100 * diff.mean(), 100 * np.quantile(means, 0.025), 100 * np.quantile(means, 0.975)


def _mean_sd(values) -> tuple:
    s = pd.Series(values, dtype=float)
    return s.mean(), (s.std(ddof=1) if len(s) > 1 else float("nan"))


def parameter_counts() -> pd.DataFrame:
    """Parameters of the code's model (no SE, SE) and of the 3x3-shortcut variants near Table 1's 4.96M / 5.02M."""
    plain = build_model(se=False)
    extra = [8 * stage[0].shortcut.conv.weight.numel() for stage in plain.stages[1:]]
    n = count_parameters(plain)
    return pd.DataFrame([("baseline, no SE (code as run)", n, "4.96M"),
                         ("with SE, r=16 (code as run)", count_parameters(build_model(se=True)), "5.02M"),
                         ("no SE, 3x3 shortcut into stage 3", n + extra[1], "4.96M"),
                         ("no SE, 3x3 shortcuts into stages 2+3", n + sum(extra), "5.02M")],
                        columns=["model", "parameters", "paper"])


def table1(runs: dict) -> pd.DataFrame:
    """Table 1 rebuilt (paper Table 1): the selected checkpoint's test accuracy (EMA where the config has
    EMA), train accuracy on mixed batches (as the paper) and clean; mean, sd over seeds, delta, parameters."""
    rows = []
    for name, dirs in runs.items():
        loaded = [load_run(d) for d in dirs]
        cfg = loaded[0]["config"]

        def mean_sd(key):        # in %, over the seeds
            return _mean_sd([100 * r["final"][key] for r in loaded])

        test = mean_sd("test_acc_ema" if cfg.ema else "test_acc_regular")
        # noise: sd over seeds when there are several, else the 95% binomial interval
        n_test = loaded[0]["final"].get("test_size", 0)
        lo, hi = binomial_interval(test[0] / 100, n_test) if len(loaded) == 1 else (float("nan"),) * 2
        rows.append({"config": name, "seeds": len(loaded), "trained_in": precisions(loaded),
                     "train_acc_mixed": mean_sd("train_acc_mixed")[0], "train_acc_clean": mean_sd("train_acc_clean")[0],
                     "test_acc": test[0], "test_acc_sd": test[1],
                     "test_acc_ci_low": 100 * lo, "test_acc_ci_high": 100 * hi,
                     "params_profile": count_parameters(build_model(se=cfg.se, widths=cfg.widths,
                                                                    blocks=cfg.blocks)),
                     "params_paper_width": count_parameters(build_model(se=cfg.se))})
    table = PAPER_TABLE1.merge(pd.DataFrame(rows), on="config", how="right")
    table["delta_test"] = table["test_acc"] - table["paper_test_acc"]
    return table


def table1_view(t1: pd.DataFrame) -> pd.DataFrame:
    """Table 1 as the report shows it: paper and reproduced columns side by side, the noise and the delta."""
    def interval(row):
        return "" if row["seeds"] != 1 else f"{row['test_acc_ci_low']:.2f} - {row['test_acc_ci_high']:.2f}"

    return pd.DataFrame({
        "configuration": t1["paper_row"], "seeds": t1["seeds"],
        "trained in": t1["trained_in"] if "trained_in" in t1 else "",
        "paper train %": t1["paper_train_acc"], "train % (mixed batches, as paper)": t1["train_acc_mixed"],
        "train % (clean)": t1["train_acc_clean"],
        "paper test %": t1["paper_test_acc"], "test %": t1["test_acc"],
        "test % sd (>= 2 seeds)": t1["test_acc_sd"], "test % 95% interval (1 seed)": t1.apply(interval, axis=1),
        "test - paper": t1["delta_test"],
        "paper params": t1["paper_params"], "params (code, paper width)": t1["params_paper_width"],
        "params (this profile)": t1["params_profile"]})


def discrepancy_table(reference: list, variants: dict, dataset, device=None) -> pd.DataFrame:
    """Effect of each paper/code switch: `final+switch`'s test accuracy and its difference to `final`'s at each
    seed both have, on the same test images (paired-bootstrap 95% interval), with the mean and sd."""
    right = _correctness(dataset, device)
    return pd.DataFrame([{"switch": name, "test_acc": 100 * np.mean([right(d).mean() for d in dirs]),
                          **claim_row(paired)}
                         for name, dirs in variants.items() if (paired := _paired(dirs, reference, right))])


def correct_on_test(run_dir, dataset, kind: str = "ema", device=None) -> np.ndarray:
    """Which images of the run's test split its `kind` ("ema" | "regular") checkpoint gets right, no TTA."""
    run = load_run(run_dir)
    test_x, test_y = split_data(run["config"], dataset)["test"]
    device = resolve_device(device)
    regular, ema = load_run_models(run_dir, device)
    model = {"regular": regular, "ema": ema}[kind]
    if model is None:
        raise SamlibError(f"{run_dir} holds no EMA checkpoint: compare kind='regular'")
    with progress_bar(total=len(test_y), unit="img", desc=f"test predictions of {run['dir'].name}") as bar:
        logits = predict_logits(model, test_x, batch_size=run["config"].eval_batch_size, device=device,
                                precision=inference_precision(run, device), bar=bar)[0]
    return logits.argmax(1).numpy() == np.asarray(test_y)


def strategy_intervals(table: pd.DataFrame) -> pd.DataFrame:
    """Per strategy (own temperature): test accuracy and its 95% binomial interval, in %."""
    rows = table[table["temperature_from"] == "strategy"].set_index("strategy")
    n = rows["test_images"] if "test_images" in rows else pd.Series(np.nan, index=rows.index)
    ci = [binomial_interval(a, int(k)) if k == k else (np.nan, np.nan) for a, k in zip(rows["test_accuracy"], n)]
    return pd.DataFrame({"test_acc": 100 * rows["test_accuracy"], "ci_low": [100 * c[0] for c in ci],
                         "ci_high": [100 * c[1] for c in ci]}, index=rows.index)


def strategy_view(table: pd.DataFrame) -> pd.DataFrame:
    """The strategy table as the report shows it: accuracies and ECE in %."""
    return table.assign(**{c: 100 * table[c] for c in ("test_accuracy", "val_accuracy", "test_ece")})


def best_strategy(table: pd.DataFrame) -> str:
    """The strategy the table selected on validation (its `selected` rows)."""
    return str(table.loc[table["selected"].astype(bool), "strategy"].iloc[0])


def claim_reading(stated: float, low: float, high: float, absolute: bool = False) -> str:
    """A paper claim read from the reproduced 95% interval: a gain (NaN: "positive") is supported above 0,
    contradicted wholly below the gain (or 0); an absolute number is supported when the interval holds it."""
    if not (low == low and high == high):
        return "cannot resolve (no interval)"
    if absolute:
        return "supported" if low <= stated <= high else "contradicted"
    if low > 0:
        return "supported"
    return "contradicted" if high <= 0 or high < stated else "cannot resolve"


def figure1_deltas(table: pd.DataFrame, paper: dict = PAPER_FIGURE1, probs: dict | None = None,
                   labels=None) -> pd.DataFrame:
    """Figure 1's claims beside the reproduced points, with paired-bootstrap 95% intervals given test `probs`
    ({strategy: (N, classes)}) and `labels`.  The paper's +0.16 ensemble gain is taken over regular + TTA."""
    acc = strategy_intervals(table).reindex(["standard", "tta", "ema+tta", "ensemble+tta", "ensemble+tta (as run)"])
    a = acc["test_acc"]
    claims = [
        ("TTA gain: tta - standard", paper["tta_gain"], ("tta", "standard"), ""),
        ("ensemble gain: ensemble+tta - tta", paper["ensemble_gain"], ("ensemble+tta", "tta"),
         "paper: 'a further +0.16'"),
        ("EMA beats regular under TTA: ema+tta - tta", float("nan"), ("ema+tta", "tta"), "paper: positive, no number"),
        ("ensemble over EMA: ensemble+tta - ema+tta", float("nan"), ("ensemble+tta", "ema+tta"), ""),
        ("as-run TTA/ensemble vs samlib's: (as run) - ensemble+tta", float("nan"),
         ("ensemble+tta (as run)", "ensemble+tta"), "code: logit average, as-run views"),
    ]
    rows = []
    for i, (claim, stated, (x, y), note) in enumerate(claims):
        lo = hi = float("nan")
        if probs is not None and x in probs and y in probs:
            right = {k: (np.asarray(probs[k].argmax(1)) == np.asarray(labels)) for k in (x, y)}
            _, lo, hi = paired_bootstrap(right[x], right[y])
        reading = claim_reading(stated, lo, hi) if i < 3 else ""      # the last two are not the paper's
        rows.append((claim, stated, a[x] - a[y], lo, hi, note, reading))
    final = acc.loc["ensemble+tta"]
    rows.append(("final accuracy: ensemble+tta (%)", paper["final"], final["test_acc"], final["ci_low"],
                 final["ci_high"], "absolute, not a delta",
                 claim_reading(paper["final"], final["ci_low"], final["ci_high"], absolute=True)))
    return pd.DataFrame(rows, columns=["claim", "paper", "reproduced", "ci95_low", "ci95_high", "note", "reading"])


def read_across_seeds(readings) -> str:
    """One reading of a claim from its reading at each seed: theirs when every seed agrees."""
    found = set(readings)
    return found.pop() if len(found) == 1 else "cannot resolve (seeds disagree)"


def claim_row(per_seed: dict, readings: dict | None = None) -> dict:
    """A row of a by-seed table: each seed's value and 95% interval ({seed: (value, low, high)}), the mean and
    sd over the seeds, and (given the seeds' `readings`, {seed: reading}) one reading."""
    row = {}
    for seed, (value, lo, hi) in per_seed.items():
        row[f"seed {seed}"] = value
        row[f"seed {seed} 95% interval"] = f"{lo:.2f} - {hi:.2f}" if lo == lo and hi == hi else ""
    row["mean"], row["sd"] = _mean_sd([value for value, _, _ in per_seed.values()])
    if readings is not None:
        row["reading"] = read_across_seeds(readings.values())
    return row


def _correctness(dataset, device):
    """run dir -> which test images the checkpoint Table 1 reports (EMA where the config has EMA) gets right,
    each run evaluated once."""
    @functools.cache
    def right(run_dir):
        return correct_on_test(run_dir, dataset, "ema" if load_run(run_dir)["config"].ema else "regular", device)
    return right


def _paired(upper: list, lower: list, right) -> dict:
    """{seed: (difference, low, high)} in points of `upper`'s runs over `lower`'s at each seed both have."""
    by_seed = [{load_run(d)["config"].seed: d for d in dirs} for dirs in (upper, lower)]
    return {s: paired_bootstrap(right(d), right(by_seed[1][s])) for s, d in by_seed[0].items() if s in by_seed[1]}


def figure1_across_seeds(deltas: dict) -> pd.DataFrame:
    """Figure 1's claims per seed of `final` ({seed: figure1_deltas}), their mean, sd and one reading."""
    per = {s: d.set_index("claim") for s, d in deltas.items()}
    first = next(iter(per.values()))
    return pd.DataFrame([{"claim": c, "paper": first.loc[c, "paper"], **claim_row(
        {s: tuple(d.loc[c, ["reproduced", "ci95_low", "ci95_high"]]) for s, d in per.items()},
        {s: d.loc[c, "reading"] for s, d in per.items()})} for c in first.index])


def table1_claims(runs: dict, dataset, device=None) -> pd.DataFrame:
    """Table 1's gains, each row over the one above (paper Table 1: SE, MixUp, EMA), paired by seed: at each
    seed the difference on the same test images with its paired-bootstrap 95% interval, then one reading."""
    paper, right, rows = PAPER_TABLE1.set_index("config"), _correctness(dataset, device), []
    for lower, upper in zip(paper.index, paper.index[1:]):
        per_seed = _paired(runs[upper], runs[lower], right) if lower in runs and upper in runs else {}
        if not per_seed:          # a row not trained here, or no seed in common
            continue
        stated = round(paper.loc[upper, "paper_test_acc"] - paper.loc[lower, "paper_test_acc"], 2)
        readings = {s: claim_reading(stated, lo, hi) for s, (_, lo, hi) in per_seed.items()}
        rows.append({"claim": f"{paper.loc[upper, 'paper_row']} gain: {upper} - {lower}", "paper": stated,
                     **claim_row(per_seed, readings)})
    return pd.DataFrame(rows)


def temperature_table(table: pd.DataFrame) -> pd.DataFrame:
    """The selected strategy at each temperature, and the code's as-run row (accuracy, ECE in %)."""
    rows = table[table["selected"].astype(bool) | table["temperature_from"].ne("strategy")
                 | table["strategy"].eq("ensemble+tta (as run)")]
    rows = rows[["strategy", "temperature", "temperature_from", "test_accuracy", "test_nll", "test_ece"]]
    return rows.assign(test_accuracy=100 * rows["test_accuracy"], test_ece=100 * rows["test_ece"])


def reliability_table(probs, labels, n_bins: int = 15) -> pd.DataFrame:
    """Per confidence bin: bin_lower, bin_upper, count, mean confidence, accuracy (NaN when empty)."""
    b = calibration_bins(probs, labels, n_bins)
    return pd.DataFrame({"bin_lower": b["edges"][:-1].numpy(), "bin_upper": b["edges"][1:].numpy(),
                         "count": b["count"].long().numpy(), "confidence": b["confidence"].numpy(),
                         "accuracy": b["accuracy"].numpy()})


def confusion_matrix(labels, predictions, classes: int = 10) -> np.ndarray:
    """Counts (true class in rows, predicted class in columns)."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    return np.bincount(labels * classes + predictions, minlength=classes * classes).reshape(classes, classes)


def class_balance(dataset, profile: str) -> pd.DataFrame:
    """Images per class (rows): all of CIFAR-10 and the profile's train / val / test splits (notebook 00)."""
    labels = {"train (all)": dataset.train_labels, "test (all)": dataset.test_labels,
              **{f"{k} ({profile})": v[1] for k, v in split_data(resolve("final", profile), dataset).items()}}
    return pd.DataFrame({k: np.bincount(v, minlength=10) for k, v in labels.items()}, index=list(dataset.classes))


def channel_table(images) -> pd.DataFrame:
    """Per-channel mean and std of `images` beside the code's constants and the true std, and the input
    std the code's constant gives (notebook 00, "Normalisation")."""
    mean, std = channel_stats(images)
    stats = pd.DataFrame({"channel": ["red", "green", "blue"], "mean (measured)": mean, "mean (code)": CIFAR_MEAN,
                          "std (measured)": std, "std (code, as run)": STD_AS_RUN, "std (true, CIFAR-10)": STD_TRUE})
    stats["input std with the code's constant"] = stats["std (measured)"] / stats["std (code, as run)"]
    return stats
