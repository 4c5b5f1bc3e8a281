"""The report's front page, results/<profile>/html/index.html: the runs' scale, the headline numbers against the
paper and each claim's reading first, then the details.  Rendered from templates/index.html.j2, autoescaped."""
import numbers
from collections import namedtuple
from pathlib import Path

import pandas as pd
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup
from pandas.api.types import is_bool_dtype, is_numeric_dtype

from ..io import atomic_write_text, read_json

PROVENANCE = ("profile", "data_source", "device", "commit", "commit_dirty", "torch", "seeds", "updated")
SCALE_COLUMNS = ("config", "seeds", "trained_in", "training_images", "epochs", "widths", "train_seconds")
HEADLINE_NAMES = {"configuration": "Table 1 row", "ci95_low": "95% interval low", "ci95_high": "95% interval high"}
IndexFigure = namedtuple("IndexFigure", "name title caption alt")   # results/<profile>/<name>.png
INDEX_FIGURES = (
    IndexFigure("training_curves", "Training curves", "First seed of each Table 1 configuration, EMA dashed; the "
                "per-epoch test curve may use a test subset, Table 1 the whole test set.",
                "Training loss, validation and test accuracy and learning rate against epoch per configuration"),
    IndexFigure("lr_schedules", "Learning-rate schedule: as written vs as run", "Drawn for the paper's 200 epochs: "
                "the warm-up then OneCycle the paper describes, and the plain OneCycle its code ran.",
                "Learning rate (log scale) and SGD momentum against epoch, as written and as run"),
    IndexFigure("figure1", "Figure 1 rebuilt: inference strategies", "Left: test accuracy of each strategy with its "
                "95% interval; right: the paper's stated gains beside the reproduced ones.",
                "Test accuracy per inference strategy with 95% intervals, and the paper's and reproduced gains"),
    IndexFigure("reliability", "Reliability diagram", "Accuracy against mean confidence per bin for the best "
                "strategy (below the diagonal: overconfident); below, each bin's share of the test images.",
                "Accuracy against confidence per bin with the diagonal, and the share of test images per bin"),
    IndexFigure("confusion", "Confusion matrix", "Best strategy on the test set: true class in rows, colour the "
                "share of the true class, counts in the cells.",
                "Ten-by-ten confusion matrix of the test set, true classes in rows, predicted in columns"),
)


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def format_number(value) -> str:
    """A number of a numeric column: ints as 4,697,162, floats as 1,234.57, NaN as ''."""
    if isinstance(value, numbers.Integral):
        return f"{value:,}"
    return "" if pd.isna(value) else f"{value:,.2f}"


def _text(value) -> str:
    """A summary.json value as one line of text: lists comma-separated, booleans yes/no."""
    if value is None or isinstance(value, bool):
        return "not recorded" if value is None else ("yes" if value else "no")
    return ", ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def frame_html(frame) -> str:
    """A DataFrame as an HTML table (cells escaped by pandas), numbers thousands-separated."""
    formatters = {col: format_number for col in frame.columns
                  if is_numeric_dtype(frame[col]) and not is_bool_dtype(frame[col])}
    return Markup(frame.to_html(index=False, na_rep="", formatters=formatters, border=0, escape=True,
                                classes="data"))


def _table(results_dir: Path, name: str, title: str, columns=None):
    """A table of the page from results_dir/<name>.csv (only `columns`, if given); None without the CSV."""
    path = results_dir / f"{name}.csv"
    if not path.exists():
        return None
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:      # not even a header line
        frame = pd.DataFrame()
    if columns:
        frame = frame[[c for c in columns if c in frame.columns]].rename(columns=HEADLINE_NAMES)
    return {"title": title, "file": path.name, "html": frame_html(frame) if len(frame) else None}


def _scale(summary: dict):
    """The runs' scale as notebook 01 recorded it (summary["scale"]): table, runs, seeds, precisions, time."""
    rows = summary.get("scale")
    if not (isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows)):
        return None
    seeds = [s for r in rows if isinstance(r.get("seeds"), list) for s in r["seeds"] if isinstance(s, int)]
    seconds = [r.get("train_seconds") for r in rows]
    precisions = {p.strip() for r in rows for p in str(r.get("trained_in")).split(",")}
    frame = pd.DataFrame(rows).map(lambda v: _text(v) if isinstance(v, list) else v)
    frame = frame[[c for c in SCALE_COLUMNS if c in frame.columns]]     # summary.json sorts the keys
    return {"html": frame_html(frame.rename(columns=lambda c: str(c).replace("_", " "))),
            "runs": len(seeds), "seeds": sorted(set(seeds)), "precisions": ", ".join(sorted(precisions)),
            "total": _duration(sum(seconds)) if all(_real(s) for s in seconds) else "not recorded"}


def render_index(results_dir) -> str:
    """The index page of results_dir (results/<profile>) as HTML text."""
    results_dir = Path(results_dir)
    path = results_dir / "summary.json"
    summary = read_json(path) if path.exists() else {}
    summary = summary if isinstance(summary, dict) else {}
    scale = _scale(summary)
    if scale and scale["seeds"]:
        summary["seeds"] = scale["seeds"]          # every run's seed, not only the Table 1 rows'
    text = {key: _text(summary.get(key)) for key in PROVENANCE}
    timings = summary.get("timings") if isinstance(summary.get("timings"), dict) else {}
    timed = len(timings) > 1 and all(_real(s) for s in timings.values())
    machine = f"trained in {scale['precisions']} | evaluated on {text['device']}" if scale else text["device"]

    def tables(specs):            # the template names the tables: (CSV name, heading[, columns])
        return [t for t in (_table(results_dir, *spec) for spec in specs) if t]

    def present(names):           # the files of results_dir that exist
        return [name for name in names if (results_dir / name).exists()]

    env = Environment(loader=FileSystemLoader(Path(__file__).resolve().parent / "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    return env.get_template("index.html.j2").render(
        profile=text["profile"], scaled_down=summary.get("profile") != "paper", scale=scale,
        provenance=list(text.items()), tables=tables, present=present,
        timings=[(str(name), f"{s:,.1f}" if _real(s) else str(s)) for name, s in sorted(timings.items())],
        total_time=f"{sum(timings.values()):,.1f}" if timed else None,
        caption=f"profile {text['profile']} | {text['data_source']} | {machine}",
        notebooks=[(p.name, p.stem) for p in sorted((results_dir / "html").glob("[0-9]*.html"))],
        figures=[f for f in INDEX_FIGURES if (results_dir / f"{f.name}.png").exists()])


def write_index(results_dir) -> Path:
    """Write results_dir/html/index.html (atomically) and return its path."""
    return atomic_write_text(Path(results_dir) / "html" / "index.html", render_index(results_dir))
