"""What every report notebook does first and last: check_params, load_data (prints the header),
save_table (profile/data/device on every table) and finish (summary.json)."""
import html
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import data as D
from .. import paths
from ..config import PROFILES, SWITCHES
from ..device import check_environment, resolve_device
from ..errors import ConfigError, SamlibError
from ..infer import STRATEGIES
from ..io import atomic_write_text, read_json, write_json
from ..rundir import provenance

REQUIRED = ("profile", "data_dir", "seeds", "results_dir", "runs_dir", "device")
EXTRAS = ("final_seeds", "switches", "kaggle_file", "strategy")
# The paper's protocol by default: the four Table 1 configs at one seed, as the paper ran.
DEFAULT_SEEDS = {"smoke": [84], "quick": [84], "cpu": [84], "paper": [84]}
# `final` may run at more seeds than the rest: the cpu report's seed-to-seed noise.
DEFAULT_FINAL_SEEDS = {"cpu": [84, 85]}
DEFAULT_SWITCHES = {"smoke": ["schedule"], "quick": [], "cpu": ["ema_reset"], "paper": []}
STRATEGY_CHOICES = ("best", *STRATEGIES)

INTERRUPTED = ("interrupted: every file written so far is intact (a run keeps its last finished epoch, "
               "an evaluation its finished parts); run this cell again to go on from there")


def _shell():
    try:
        return get_ipython()  # noqa: F821 - defined inside IPython only
    except NameError:
        return None


def _show_one_line(shell, etype, value, tb, tb_offset=None):
    """In a notebook kernel, a samlib error or an interrupt shows as one line, not a traceback; the cell still fails."""
    stb = [INTERRUPTED if issubclass(etype, KeyboardInterrupt) else f"error: {value}"]
    shell._showtraceback(etype, value, stb)    # as IPython shows any error (kernel: an error output)
    return stb


if _shell() is not None:
    _shell().set_custom_exc((SamlibError, KeyboardInterrupt), _show_one_line)


def _png_with_alt_text(fig) -> tuple:
    """A figure as PNG with {"alt": its title}, so the notebooks' HTML pages get alt text."""
    from IPython.core.pylabtools import print_figure

    title = fig._suptitle.get_text() if getattr(fig, "_suptitle", None) else ""
    alt = title.replace("\n", " - ") or "a figure of this report"
    return print_figure(fig, "png", bbox_inches="tight"), {"alt": alt}


@dataclass
class Params:
    """Checked, resolved notebook parameters (paths absolute, "auto" resolved)."""
    profile: str
    requested_profile: str
    data_dir: Path
    seeds: list
    device: str
    results: Path          # results_dir / profile
    runs: Path             # runs_dir / profile
    extra: dict = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    data_source: str = "not loaded yet"
    provenance: dict = field(default_factory=dict)
    trained_in: str = ""   # the precision the reported runs trained in (their provenance), when known

    @property
    def caption(self) -> str:
        """The line every figure and table carries: profile, data source, precision, device."""
        device = self.provenance.get("device", self.device)
        machine = f"trained in {self.trained_in} | evaluated on {device}" if self.trained_in else device
        return f"profile {self.profile} | {self.data_source} | {machine}"

    @property
    def scale_note(self) -> str:
        """For scaled-down profiles: why their numbers are not the paper's ('' for paper)."""
        if self.profile == "paper":
            return ""
        knobs = ", ".join(f"{k}={v}" for k, v in PROFILES[self.profile].items())
        return (f"Profile {self.profile} is a scaled-down run ({knobs}): its numbers are not the paper's "
                "setting, and a difference to the paper's column measures the scale-down, not the paper's claim.")

    def __getattr__(self, name):          # notebook-specific parameters: p.kaggle_file, ...
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(name)


def _fail(name, expected, value):
    raise ConfigError(f"notebook parameter {name} must be {expected}; got {value!r}")


def _seed_list(name, seeds) -> list:
    seeds = list(seeds) if isinstance(seeds, tuple) else seeds
    valid = isinstance(seeds, list) and seeds and all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0 for s in seeds)
    if not valid:
        _fail(name, "None or a non-empty list of non-negative ints, e.g. [84] or [84, 85, 86]", seeds)
    if len(set(seeds)) != len(seeds):
        _fail(name, "a list without repeats", seeds)
    return [int(s) for s in seeds]


def _path(name, value, written: bool = False) -> Path:
    """A path parameter, resolved; a folder the notebook writes is checked for writing first."""
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        _fail(name, "a path (string)", value)
    return (paths.output_dir if written else paths.resolved)(value, f"parameter {name}")


def _extra(name, value, profile: str, seeds: list):
    """One notebook-specific parameter, checked and resolved."""
    if name == "final_seeds":         # always a superset of `seeds`
        value = _seed_list(name, DEFAULT_FINAL_SEEDS.get(profile, seeds) if value is None else value)
        return seeds + [s for s in value if s not in seeds]
    if name == "switches":
        if value is None:
            value = DEFAULT_SWITCHES[profile]
        elif value == "all":
            value = list(SWITCHES)
        if not isinstance(value, (list, tuple)) or not all(v in SWITCHES for v in value):
            _fail(name, f'None, "all" or a list of names from {list(SWITCHES)}', value)
        return list(value)
    if name == "kaggle_file":
        return None if value in (None, "", "None") else str(_path(name, value))
    if name == "strategy":
        if value not in STRATEGY_CHOICES:
            _fail(name, f"one of {list(STRATEGY_CHOICES)}", value)
        return value
    raise ConfigError(f"unknown notebook parameter {name!r}; known: {', '.join(REQUIRED + EXTRAS)}")


def check_params(profile, data_dir, seeds, results_dir, runs_dir, device, **extra) -> Params:
    """The parameters cell's values, checked (ConfigError names the first bad one) and resolved: profile "auto"
    is paper on CUDA, else quick; seeds None are DEFAULT_SEEDS; `extra`: EXTRAS."""
    check_environment()
    try:
        dev = resolve_device(None if device == "auto" else device)     # None: cuda when available
    except SamlibError:
        _fail("device", '"auto", "cpu" or "cuda[:n]" naming a GPU of this machine', device)
    resolved = ("paper" if dev.type == "cuda" else "quick") if profile == "auto" else profile
    if not (isinstance(resolved, str) and resolved in PROFILES):
        _fail("profile", f'"auto" or one of {list(PROFILES)}', profile)
    seeds = _seed_list("seeds", DEFAULT_SEEDS[resolved] if seeds is None else seeds)
    checked = {name: _extra(name, value, resolved, seeds) for name, value in extra.items()}
    return Params(profile=resolved, requested_profile=str(profile), data_dir=_path("data_dir", data_dir),
                  seeds=seeds, device=str(dev),
                  results=_path("results_dir", results_dir, written=True) / resolved,
                  runs=_path("runs_dir", runs_dir, written=True) / resolved, extra=checked)


def load_data(p: Params, download: bool = True):
    """Load CIFAR-10 from p.data_dir (downloading when absent), record its source, print the header."""
    if _shell() is not None:          # after %matplotlib inline, which registers its own formatter
        from matplotlib.figure import Figure

        _shell().display_formatter.formatters["image/png"].for_type(Figure, _png_with_alt_text)
    dataset = D.load_cifar10(p.data_dir, download=download)
    p.data_source = D.describe_source(dataset, p.data_dir)
    p.provenance = prov = provenance(torch.device(p.device), p.data_source)
    requested = f"  (requested {p.requested_profile!r})" if p.requested_profile != p.profile else ""
    knobs = ", ".join(f"{k}={v}" for k, v in PROFILES[p.profile].items())
    commit = (prov.get("git_commit") or "")[:12] or "unknown (not a git checkout)"
    lines = [f"profile    : {p.profile}{requested}",
             f"             {knobs or 'the paper: full width, 200 epochs, 45,000 training images'}",
             f"data       : {p.data_source} at {p.data_dir}  "
             f"[{len(dataset.train_labels)} train / {len(dataset.test_labels)} test]",
             f"device     : {prov.get('device', p.device)}",
             f"torch      : {torch.__version__} (torchvision {prov.get('torchvision', '?')})",
             f"git commit : {commit}{' + uncommitted changes' if prov.get('git_dirty') else ''}",
             f"seeds      : {p.seeds}",
             f"results    : {p.results}",
             f"runs       : {p.runs}",
             *(f"{k:<11}: {v}" for k, v in p.extra.items())]
    print("\n".join(lines + (["NOTE: " + p.scale_note] if p.scale_note else [])))
    return dataset


def markdown_table(frame) -> str:
    """A GitHub markdown table: floats to 2 decimals, thousands separated, "|" in text escaped."""
    text = frame.apply(lambda col: col if pd.api.types.is_numeric_dtype(col) or col.isna().all()
                       else col.map(lambda v: v if pd.isna(v) else str(v).replace("|", "\\|")))
    text = text.astype(object).where(text.notna(), None)       # tabulate's missingval needs None
    return text.to_markdown(index=False, floatfmt=",.2f", intfmt=",", missingval="") + "\n"


# The report shows column names a reader understands; the CSV files keep the short ones.
READABLE = {"test_acc": "test %", "test_acc_sd": "test % sd (>= 2 seeds)", "temperature": "T",
            "temperature_from": "T from", "selected": "selected (best on validation)", "test_images": "test images",
            "test_accuracy": "test accuracy", "test_nll": "test NLL", "test_ece": "test ECE",
            "val_accuracy": "validation accuracy"}


def save_table(frame, p: Params, name: str, title: str, notes: str = ""):
    """Write results/<profile>/<name>.csv and .md (caption, notes, READABLE names); return it styled for display."""
    atomic_write_text(p.results / f"{name}.csv", frame.to_csv(index=False))
    frame = frame.rename(columns=READABLE)
    notes = "\n\n".join(n.strip() for n in (notes, p.scale_note) if n)
    md = f"### {title}\n\n_{p.caption}_\n\n{markdown_table(frame)}" + (f"\n{notes}\n" if notes else "")
    atomic_write_text(p.results / f"{name}.md", md)
    return (frame.style.format(precision=2, thousands=",", na_rep="-")
            .set_caption(f"{title} &mdash; {html.escape(p.caption)}").hide(axis="index"))


def drop_table(p: Params, name: str) -> None:
    """Remove a table an earlier report wrote and this one does not (no stale one in the index)."""
    for suffix in (".csv", ".md"):
        (p.results / f"{name}{suffix}").unlink(missing_ok=True)


def _jsonable(obj):
    """Strict JSON values: DataFrames as records, numpy values as Python ones, NaN and inf as null."""
    def default(value):
        if hasattr(value, "columns"):
            return value.to_dict("records")
        return value.tolist() if hasattr(value, "tolist") else str(value)

    return json.loads(json.dumps(obj, default=default), parse_constant=lambda name: None)


def update_summary(p: Params, notebook: str | None = None, **sections) -> dict:
    """Merge sections into results/<profile>/summary.json; the top-level commit only while all notebooks' agree."""
    path = p.results / "summary.json"
    summary = read_json(path) if path.exists() else {}
    timings = dict(summary.get("timings", {}), **sections.pop("timings", {}))
    prov, now = p.provenance, time.strftime("%Y-%m-%d %H:%M:%S")
    parts = dict(summary.get("provenance") or {})
    if notebook:
        parts[notebook] = {"commit": prov.get("git_commit"), "commit_dirty": prov.get("git_dirty"), "updated": now}
    commits = {(v or {}).get("commit") for v in parts.values()} or {prov.get("git_commit")}
    dirty = any((v or {}).get("commit_dirty") for v in parts.values()) if parts else prov.get("git_dirty")
    summary.update({"profile": p.profile, "data_source": p.data_source,
                    "device": prov.get("device", p.device),
                    "commit": commits.pop() if len(commits) == 1 else "several: see provenance",
                    "commit_dirty": dirty, "torch": prov.get("torch"),
                    "seeds": p.seeds, **_jsonable(sections), "timings": timings, "provenance": parts,
                    "updated": now})
    write_json(path, summary)
    return summary


def finish(p: Params, notebook: str, **sections) -> None:
    """Record this notebook's wall time (and any sections) in summary.json; print where."""
    seconds = round(time.time() - p.started, 1)
    update_summary(p, notebook, timings={notebook: seconds}, **sections)
    print(f"{notebook}: {seconds} s; summary in {p.results / 'summary.json'}")
