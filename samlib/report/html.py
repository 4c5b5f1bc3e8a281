"""The report's front page, results/<profile>/html/index.html: where the numbers come from
(provenance, time per notebook), links to the notebook pages, the main tables and figures.

The page is rendered from templates/index.html.j2 with autoescaping on, so any text from
summary.json or a CSV (a data-source label, a switch name) is shown, never run as HTML.
`python -m samlib.report.notebooks index RESULTS/<profile>` writes it after nbconvert.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_write_text, read_json

TEMPLATES = Path(__file__).resolve().parent / "templates"
PROVENANCE = ("profile", "data_source", "device", "commit", "commit_dirty", "torch", "seeds", "updated")
INDEX_TABLES = (("table1", "Table 1 rebuilt"), ("discrepancies", "Paper/code switches on the final config"),
                ("figure1_deltas", "Figure 1: the paper's claims and the reproduced numbers"),
                ("temperature", "Temperature scaling"))


@dataclass(frozen=True)
class IndexFigure:
    """A figure of the page: results/<profile>/<name>.png with its heading, caption and alt text."""
    name: str
    title: str
    caption: str
    alt: str


INDEX_FIGURES = (
    IndexFigure("training_curves", "Training curves",
                "First seed of each Table 1 configuration, EMA weights dashed; the per-epoch test curve "
                "may use a test subset, Table 1 the whole test set.",
                "Training loss, validation accuracy, test accuracy and learning rate against epoch "
                "for each Table 1 configuration"),
    IndexFigure("lr_schedules", "Learning-rate schedule: as written vs as run",
                "Drawn for the paper's 200 epochs whatever the profile: the warm-up then OneCycle the "
                "paper describes, and the plain OneCycle its code ran.",
                "Learning rate on a log scale and SGD momentum against epoch, the schedule as written "
                "and as run"),
    IndexFigure("figure1", "Figure 1 rebuilt: inference strategies",
                "Left: test accuracy of each strategy with its 95% interval; right: the paper's stated "
                "gains beside the reproduced ones.",
                "Test accuracy per inference strategy with 95% intervals, and bars of the paper's and "
                "the reproduced TTA and ensemble gains"),
    IndexFigure("reliability", "Reliability diagram",
                "Accuracy against mean confidence per bin for the best strategy: points below the "
                "diagonal are overconfident; the lower panel is each bin's share of the test images.",
                "Accuracy against confidence per bin with the diagonal of perfect calibration, and the "
                "share of test images per bin"),
    IndexFigure("confusion", "Confusion matrix",
                "Best strategy on the test set: true class in rows, colour the share of the true class, "
                "counts in the cells.",
                "Ten-by-ten confusion matrix of the test set, true classes in rows and predicted classes "
                "in columns"),
)
DOWNLOADS = ("summary.json", "table1.md", "submission.csv")


# ---------------------------------------------------------------- formatting

def format_number(value) -> str:
    """Ints as 4,697,162, floats as 1,234.57, missing values (None, NaN) as ''; text as is."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{value:,}"
    if isinstance(value, numbers.Real):
        return "" if math.isnan(value) else f"{value:,.2f}"
    return str(value)


def _provenance_text(value) -> str:
    """A summary.json value as one line of the provenance table."""
    if value is None:
        return "not recorded"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _seconds(value) -> str:
    """A notebook's wall time as 1,234.5 (one decimal, as summary.json records it)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return f"{value:,.1f}"
    return str(value)


# ---------------------------------------------------------------- page parts

def _summary(results_dir: Path) -> dict:
    """summary.json as a dict; {} before any notebook has written one."""
    path = results_dir / "summary.json"
    summary = read_json(path) if path.exists() else {}
    return summary if isinstance(summary, dict) else {}


def _timings(summary: dict) -> dict:
    """{"rows": [(notebook, seconds text)], "total": text or None} from summary["timings"]."""
    timings = summary.get("timings")
    if not isinstance(timings, dict):
        return {"rows": [], "total": None}
    rows = [(str(name), _seconds(s)) for name, s in sorted(timings.items())]
    numeric = [s for s in timings.values() if isinstance(s, numbers.Real) and not isinstance(s, bool)]
    total = _seconds(sum(numeric)) if len(rows) > 1 and len(numeric) == len(rows) else None
    return {"rows": rows, "total": total}


def frame_html(frame) -> str:
    """A DataFrame as an HTML table (cells escaped by pandas), numbers thousands-separated."""
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    formatters = {col: format_number for col in frame.columns
                  if is_numeric_dtype(frame[col]) and not is_bool_dtype(frame[col])}
    return frame.to_html(index=False, na_rep="", formatters=formatters, border=0, escape=True,
                         classes="data")


def _table(results_dir: Path, name: str, title: str):
    """One table of the page, or None when its CSV does not exist; "html" is None when the CSV
    has no rows (the page says so instead of drawing an empty table)."""
    import pandas as pd
    from markupsafe import Markup

    path = results_dir / f"{name}.csv"
    if not path.exists():
        return None
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:      # not even a header line
        frame = pd.DataFrame()
    return {"name": name, "title": title, "file": path.name,
            "html": Markup(frame_html(frame)) if len(frame) else None}


def render_index(results_dir) -> str:
    """The index page of results_dir (results/<profile>) as HTML text."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    results_dir = Path(results_dir)
    summary = _summary(results_dir)
    text = {key: _provenance_text(summary.get(key)) for key in PROVENANCE}
    tables = [t for t in (_table(results_dir, name, title) for name, title in INDEX_TABLES) if t]
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    return env.get_template("index.html.j2").render(
        profile=text["profile"],
        scaled_down=summary.get("profile") != "paper",
        provenance=list(text.items()),
        caption=f"profile {text['profile']} | {text['data_source']} | {text['device']}",
        timings=_timings(summary),
        notebooks=[(p.name, p.stem) for p in sorted((results_dir / "html").glob("[0-9]*.html"))],
        tables=tables,
        figures=[f for f in INDEX_FIGURES if (results_dir / f"{f.name}.png").exists()],
        downloads=[name for name in DOWNLOADS if (results_dir / name).exists()])


def write_index(results_dir) -> Path:
    """Write results_dir/html/index.html (atomically) and return its path."""
    results_dir = Path(results_dir)
    return atomic_write_text(results_dir / "html" / "index.html", render_index(results_dir))
