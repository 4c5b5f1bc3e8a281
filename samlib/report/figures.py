"""The report's figures, as matplotlib Figures (not pyplot: a notebook shows each once, none pile up in
memory); given `save`, each is written as a PNG, with `caption` (Params.caption) under its title."""
import io

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..data import CIFAR_MEAN, CLASSES, STD_AS_RUN, STD_TRUE
from ..infer import STRATEGIES
from ..io import atomic_write_bytes
from ..optim import schedule_curves
from .runs import load_run
from .tables import figure1_deltas, strategy_intervals


def _figure(size, *grid, **kwargs) -> tuple:
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(*grid, **kwargs)


def _finish(fig: Figure, title: str, caption: str, save, axes=(), legend: int = 8, grid: bool = True) -> Figure:
    """Legend (and grid) on `axes`, title and caption on top; the PNG written atomically to `save`."""
    for ax in axes:
        if grid:
            ax.grid(alpha=0.3)
        ax.legend(fontsize=legend)
    if title or caption:
        fig.suptitle("\n".join(s for s in (title, caption) if s), fontsize=10)
    if save:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        atomic_write_bytes(save, buf.getvalue())
    return fig


def sample_grid(images, labels=None, classes=CLASSES, per_class=8, names=None, title="Samples",
                caption="", save=None, seed=0) -> Figure:
    """One row per class of `per_class` random images; without labels, the first 10 * per_class titled by `names`."""
    rng = np.random.default_rng(seed)
    if labels is not None:
        labels = np.asarray(labels)
        rows = [rng.choice(np.flatnonzero(labels == c), min(per_class, (labels == c).sum()), replace=False)
                for c in range(len(classes))]
        row_names = list(classes)
    else:
        idx = np.arange(min(len(images), 10 * per_class))
        rows = [idx[i:i + per_class] for i in range(0, len(idx), per_class)]
        row_names = [""] * len(rows)
    fig, axes = _figure((per_class * 0.9 + 1.2, len(rows) * 0.95 + 0.8), len(rows), per_class, squeeze=False)
    for r, (row, name) in enumerate(zip(rows, row_names)):
        for c, ax in enumerate(axes[r]):
            ax.set(xticks=[], yticks=[])
            if c >= len(row):
                ax.axis("off")
                continue
            ax.imshow(images[row[c]])
            if names is not None:
                ax.set_title(str(names[row[c]]), fontsize=6)
        axes[r, 0].set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    return _finish(fig, title, caption, save)


def plot_class_balance(counts: pd.DataFrame, title="Images per class", caption="", save=None) -> Figure:
    """Grouped bars: `counts` indexed by class name, one column per split."""
    fig, ax = _figure((9, 3.6))
    width = 0.8 / max(1, counts.shape[1])
    for i, col in enumerate(counts.columns):
        ax.bar(np.arange(len(counts)) + i * width - 0.4 + width / 2, counts[col], width, label=str(col))
    ax.set_xticks(np.arange(len(counts)), counts.index, rotation=30, ha="right")
    ax.set_ylabel("images")
    return _finish(fig, title, caption, save, (ax,), grid=False)


def plot_pixel_histograms(images, title="Pixel values per channel", caption="", save=None,
                          max_images=5000, seed=0) -> Figure:
    """Histogram of pixel values (0..1) per channel, with the code's mean +- std (as run and true) marked."""
    images = np.asarray(images)
    if len(images) > max_images:
        images = images[np.random.default_rng(seed).choice(len(images), max_images, replace=False)]
    fig, axes = _figure((12, 3.4), 1, 3, sharey=True)
    for ch, (ax, channel) in enumerate(zip(axes, ("red", "green", "blue"))):
        ax.hist(images[..., ch].ravel() / 255.0, bins=64, range=(0, 1), color=channel, alpha=0.6)
        m = CIFAR_MEAN[ch]
        ax.axvline(m, color="k", lw=1, label=f"mean {m:.4f}")
        for std, style, name in ((STD_AS_RUN[ch], "--", "std as run"), (STD_TRUE[ch], ":", "true std")):
            ax.axvline(m - std, color="k", ls=style, lw=1, label=f"{name} {std:.4f}")
            ax.axvline(m + std, color="k", ls=style, lw=1)
        ax.set_title(channel, fontsize=9)
        ax.set_xlabel("pixel value")
    axes[0].set_ylabel("pixels")
    return _finish(fig, title, caption, save, axes, legend=7, grid=False)


def plot_training_curves(runs: dict, title="Training curves (first seed of each config)", caption="",
                         save=None) -> Figure:
    """Loss, accuracy (EMA dashed) and LR per epoch of each config's first run; the test curve may use a subset."""
    fig, ((ax_loss, ax_val), (ax_test, ax_lr)) = _figure((12, 7), 2, 2, sharex=True)
    for k, (name, dirs) in enumerate(runs.items()):
        m = load_run(dirs[0])["metrics"]
        if m.empty:
            continue
        # Configs that train identically (final = se_mixup + an EMA) draw the same regular curve:
        # markers of other shapes and sizes and thinner lines on top keep each visible.
        style = dict(color=f"C{k}", marker="os^xDv+"[k % 7], markersize=8 - 1.5 * k, lw=2.2 - 0.4 * k,
                     alpha=0.85)
        ax_loss.plot(m["epoch"], m["train_loss"], label=name, **style)
        for ax, col in ((ax_val, "val_acc"), (ax_test, "test_acc")):
            ax.plot(m["epoch"], 100 * m[col], label=f"{name} regular", **style)
            if m[f"{col}_ema"].notna().any():
                ax.plot(m["epoch"], 100 * m[f"{col}_ema"], ls="--", label=f"{name} EMA", **style)
        ax_lr.plot(m["epoch"], m["lr"], label=name, **style)
    ax_loss.set_ylabel("train loss (mixed targets for MixUp)")
    ax_val.set_ylabel("validation accuracy (%)")
    ax_test.set(ylabel="test accuracy (%), per-epoch curve", xlabel="epoch")
    ax_lr.set(ylabel="LR at the end of the epoch", yscale="log", xlabel="epoch")
    return _finish(fig, title, caption, save, (ax_loss, ax_val, ax_test, ax_lr), legend=7)


def plot_lr_schedules(epochs=200, steps_per_epoch=50, title=None, caption="", save=None, **kwargs) -> Figure:
    """LR and momentum per step of the paper's schedule as written (warm-up, OneCycle) and as run (OneCycle)."""
    fig, (ax_lr, ax_m) = _figure((11, 3.8), 1, 2)
    for kind, style in (("as_written", "-"), ("as_run", "--")):
        lrs, moms = schedule_curves(kind, epochs, steps_per_epoch, **kwargs)
        x = np.arange(len(lrs)) / steps_per_epoch
        ax_lr.plot(x, lrs, style, label=f"{kind} (peak at epoch {x[np.argmax(lrs)]:.0f}, ends at {lrs[-1]:.1e})")
        ax_m.plot(x, moms, style, label=kind)
    ax_lr.set(yscale="log", ylabel="learning rate", xlabel="epoch")
    ax_m.set(ylabel="SGD momentum", xlabel="epoch")
    title = title or f"Learning-rate schedule as written vs as run, drawn for the paper's {epochs} epochs"
    return _finish(fig, title, caption, save, (ax_lr, ax_m))


def plot_figure1(table: pd.DataFrame, paper: dict, title="Figure 1 rebuilt: inference strategies",
                 caption="", save=None, deltas: pd.DataFrame | None = None) -> Figure:
    """Left: each strategy's test accuracy with its 95% interval, on an axis a few intervals tall (gaps within
    the noise look small).  Right: the paper's stated gains beside the reproduced ones (`deltas`)."""
    fig, (ax, ax_d) = _figure((13, 4.4), 1, 2, width_ratios=(1.6, 1))
    acc = strategy_intervals(table)
    acc = acc.loc[[s for s in STRATEGIES if s in acc.index]]
    for i, (name, row) in enumerate(acc.iterrows()):
        ax.errorbar(i, row["test_acc"], yerr=[[row["test_acc"] - row["ci_low"]], [row["ci_high"] - row["test_acc"]]],
                    fmt="o", color="C3" if "as run" in name else "C0", capsize=4)
        ax.annotate(f"{row['test_acc']:.2f}", (i, row["ci_high"]), textcoords="offset points",
                    xytext=(0, 4), ha="center", fontsize=8)
    ax.set_xticks(np.arange(len(acc)), acc.index, rotation=25, ha="right")
    width = np.nanmax(acc["ci_high"] - acc["ci_low"]) if acc["ci_low"].notna().any() else 1.0
    lo, hi = np.nanmin(acc["ci_low"].fillna(acc["test_acc"])), np.nanmax(acc["ci_high"].fillna(acc["test_acc"]))
    ax.set_ylim(max(0, lo - max(width, 0.5)), min(100, hi + max(width, 0.5)))
    ax.set_ylabel("test accuracy (%), 95% interval")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"reproduced; the paper's final {paper['final']:.2f}% is drawn when on this axis", fontsize=9)
    if ax.get_ylim()[0] <= paper["final"] <= ax.get_ylim()[1]:
        ax.axhline(paper["final"], color="k", ls="--", lw=1, label=f"paper final {paper['final']:.2f}%")
        ax.legend(fontsize=8)
    deltas = (deltas if deltas is not None else figure1_deltas(table, paper)).iloc[:2]
    x = np.arange(len(deltas))
    yerr = np.vstack([deltas["reproduced"] - deltas["ci95_low"], deltas["ci95_high"] - deltas["reproduced"]])
    ax_d.bar_label(ax_d.bar(x - 0.2, deltas["paper"], 0.4, label="paper", color="0.6"), fmt="%+.2f", fontsize=8)
    ax_d.bar_label(ax_d.bar(x + 0.2, deltas["reproduced"], 0.4, label="reproduced (95% interval)", color="C0",
                            yerr=None if np.isnan(yerr).all() else yerr, capsize=4), fmt="%+.2f", fontsize=8, padding=2)
    ax_d.axhline(0, color="k", lw=0.8)
    ax_d.set_xticks(x, ["TTA - standard", "ensemble+TTA - TTA"])
    ax_d.set_ylabel("gain (percentage points)")
    return _finish(fig, title, caption, save, (ax_d,), grid=False)


def plot_reliability(tables, title="Reliability diagram", caption="", save=None) -> Figure:
    """Accuracy vs confidence per bin (reliability_table, or {label: table}) and each bin's share of images."""
    tables = {"": tables} if isinstance(tables, pd.DataFrame) else tables
    fig, (ax, ax_n) = _figure((5.6, 6), 2, 1, height_ratios=(3, 1), sharex=True)
    ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls=":", label="perfect calibration")
    for i, (label, t) in enumerate(tables.items()):
        filled = t[t["count"] > 0]
        ax.plot(filled["confidence"], filled["accuracy"], "o-", color=f"C{i}", label=label or "model")
        ax_n.bar((t["bin_lower"] + t["bin_upper"]) / 2 + (i - (len(tables) - 1) / 2) * 0.02,
                 t["count"] / t["count"].sum(), width=0.9 / len(t) / max(1, len(tables)), color=f"C{i}")
    ax.set(ylabel="accuracy in bin", xlim=(0, 1), ylim=(0, 1))
    ax_n.set(xlabel="confidence (max probability)", ylabel="share")
    return _finish(fig, title, caption, save, (ax,))


def plot_confusion(cm, classes=CLASSES, title="Confusion matrix", caption="", save=None) -> Figure:
    """Row-normalised confusion matrix (true class in rows), counts in the cells, the share right in the title."""
    cm = np.asarray(cm)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = _figure((7, 6.2))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(cm):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true")
    fig.colorbar(im, ax=ax, label="share of the true class")
    return _finish(fig, f"{title} ({100 * np.trace(cm) / max(cm.sum(), 1):.2f}% correct)", caption, save)


def plot_prediction_histogram(counts, classes=CLASSES, title="Predicted classes", caption="",
                              save=None) -> Figure:
    """Bar chart of how many images were predicted as each class."""
    counts = np.asarray(counts)
    fig, ax = _figure((8, 3.4))
    ax.bar_label(ax.bar(range(len(counts)), counts), fontsize=8)
    ax.axhline(counts.sum() / len(counts), color="k", ls=":", lw=1, label="uniform")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_ylabel("images")
    return _finish(fig, title, caption, save, (ax,), grid=False)
