"""`make report`'s notebook runner: every report notebook, in order, through papermill.

The parameters are checked once, before anything is written.  A notebook that stops on a user
mistake (a samlib error) ends the run with one `error:` line and exit status 2; anything else
keeps its traceback.  An interrupted report resumes: finished runs are reused.  Repository tooling,
not part of samlib: `python tools/report.py -h`.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from samlib import errors
from samlib.errors import ConfigError, SamlibError
from samlib.report.params import REQUIRED, check_params

from nbfilter import ROOT, path_replacements, scrub_paths     # tools/nbfilter.py, beside this script

NOTEBOOKS = ("00_data_exploration", "01_table1_ablation", "02_figure1_inference", "03_submission")
EXTRA_PARAMETERS = {"00_data_exploration": ("kaggle_file",), "01_table1_ablation": ("final_seeds", "switches"),
                    "02_figure1_inference": ("final_seeds",), "03_submission": ("kaggle_file",)}
# What the terminal shows of a notebook's output: the plan (samlib.plan.format_plan) and one
# line per epoch (samlib.train.epoch_line); tests/test_entry_errors.py keeps them in step.
PROGRESS = re.compile(r"^(run +epochs +state|\S.* seed \d+ +\d+  |\d+ runs?, \d+ to train"
                      r"|\S.* seed \d+: epoch \d+/\d+ )")
USER_ERRORS = {name for name, value in vars(errors).items()
               if isinstance(value, type) and issubclass(value, SamlibError)}


def _names(text: str | None, what: str, parse=str) -> list | None:
    if not text:
        return None
    try:
        return [parse(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be a comma-separated list, e.g. --{what} 84,85; got {text!r}") from None


def parameters(args) -> dict:
    """The notebooks' parameters, checked (ConfigError on the first bad one); "auto" resolved once."""
    values = dict(profile=args.profile, data_dir=str(Path(args.data_dir).resolve()),
                  seeds=_names(args.seeds, "seeds", int), final_seeds=_names(args.final_seeds, "final-seeds", int),
                  results_dir=str(Path(args.results).resolve()), runs_dir=str(Path(args.runs).resolve()),
                  device=args.device, switches="all" if args.switches == "all" else _names(args.switches, "switches"),
                  kaggle_file=str(Path(args.kaggle_file).resolve()) if args.kaggle_file else None)
    values["profile"] = check_params(**values).profile
    return values


class ProgressOnly:
    """A text stream that passes on only the progress lines of what is written to it."""

    def __init__(self, out):
        self.out, self.pending = out, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            if PROGRESS.match(line):
                self.out.write(line + "\n")
                self.out.flush()
        return len(text)

    def flush(self) -> None:
        self.out.flush()


def run_notebook(name: str, values: dict, notebooks: Path, results: Path) -> Path:
    """Execute one notebook into results/, its output filtered to progress, its paths scrubbed."""
    import papermill
    from jupyter_client.manager import AsyncKernelManager

    class LocalKernelManager(AsyncKernelManager):     # IPC sockets: nothing on the network
        transport = "ipc"

    wanted = {*REQUIRED, *EXTRA_PARAMETERS.get(name, ())}
    out = results / f"{name}.ipynb"
    papermill.execute_notebook(str(notebooks / f"{name}.ipynb"), str(out), cwd=str(notebooks),
                               parameters={k: v for k, v in values.items() if k in wanted and v is not None},
                               progress_bar=False, log_output=True, stdout_file=ProgressOnly(sys.stdout),
                               stderr_file=ProgressOnly(sys.stdout), kernel_manager_class=LocalKernelManager)
    folders = [values["data_dir"], values["runs_dir"], values["results_dir"], values.get("kaggle_file")]
    scrub_paths(out, path_replacements(folders))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/report.py", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="auto")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seeds", help="comma-separated, e.g. 84,85")
    ap.add_argument("--final-seeds", help="more seeds for final only (default: the profile's)")
    ap.add_argument("--switches", help='comma-separated names, or "all"')
    ap.add_argument("--kaggle-file")
    ap.add_argument("--results", default="local/results",
                    help="parent of <profile>/ (default local/results, git-ignored; results/ is for `make publish`)")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--notebooks", default=str(ROOT / "notebooks"))
    args = ap.parse_args(argv)
    try:
        values = parameters(args)
    except SamlibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = Path(values["results_dir"]) / values["profile"]
    results.mkdir(parents=True, exist_ok=True)
    from papermill.exceptions import PapermillExecutionError

    for name in NOTEBOOKS:
        start = time.time()
        try:
            out = run_notebook(name, values, Path(args.notebooks), results)
        except PapermillExecutionError as e:
            if e.ename not in USER_ERRORS:
                raise
            print(f"error: {name}: {e.evalue} (the notebook as far as it ran: {results / name}.ipynb)",
                  file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"interrupted in {name}; run make report again to resume (finished runs are reused)",
                  file=sys.stderr)
            return 130
        print(f"{name}: {time.time() - start:.0f} s -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
