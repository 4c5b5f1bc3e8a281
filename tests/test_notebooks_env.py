"""environment.yml agrees with pyproject.toml, and the report notebooks keep their contract:
a python3 kernelspec, a `parameters`-tagged first code cell defining the names papermill and
`make report` pass, defaults that pass samlib.report.params.check_params, and no stored outputs
except those of the `# NBVAL_CHECK_OUTPUT` cells (which nbval compares)."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import nbfilter                         # tools/nbfilter.py
from samlib.report import params as nbparams

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = {
    "00_data_exploration": {"kaggle_file"},
    "01_table1_ablation": {"final_seeds", "switches"},
    "02_figure1_inference": {"final_seeds"},
    "03_submission": {"kaggle_file", "strategy"},
}


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _environment():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return conda, pip


def _compatible(env: Requirement, project: Requirement) -> bool:
    """Same bounds, or an exact pin that pyproject's range allows."""
    if env.specifier == project.specifier:
        return True
    pins = [s.version for s in env.specifier if s.operator == "=="]
    return len(pins) == 1 and project.specifier.contains(pins[0], prereleases=True)


def test_environment_yml_has_every_pyproject_dependency():
    project = _pyproject()["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    conda, pip = _environment()
    have = {canonicalize_name(r.name): r for r in (Requirement(s) for s in pip if not s.startswith("-"))}
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in have, f"environment.yml lacks {req} (pyproject.toml)"
        assert _compatible(have[name], req), f"environment.yml has {have[name]}, pyproject.toml {req}"
    extra = set(have) - {canonicalize_name(r.name) for r in wanted}
    assert not extra, f"environment.yml pip packages not in pyproject.toml: {sorted(extra)}"
    assert "-e .[dev]" in pip, "environment.yml must install samlib itself (-e .[dev])"


def test_environment_yml_python_matches_requires_python():
    conda, _ = _environment()
    python = [Requirement(s) for s in conda if re.match(r"python\b", s)]
    assert len(python) == 1 and "pip" in conda
    assert str(python[0].specifier) == _pyproject()["project"]["requires-python"]


def _load(name):
    return json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())


def _parameters_cell(nb):
    """The code cell after the setup cell: the one papermill overrides."""
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "from samlib.report.colab import setup" in "".join(code[0]["source"]), "first code cell: the setup cell"
    return code[1]


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_kernelspec_and_parameters_cell(name):
    nb = _load(name)
    spec = nb["metadata"]["kernelspec"]
    assert spec["name"] == "python3" and spec["language"] == "python"
    cell = _parameters_cell(nb)
    assert "parameters" in cell["metadata"].get("tags", []), "the cell after the setup cell must be tagged 'parameters'"
    tree = ast.parse("".join(cell["source"]))
    assigned = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    required = set(nbparams.REQUIRED) | NOTEBOOKS[name]
    assert required <= assigned, f"parameters cell lacks {sorted(required - assigned)}"
    # papermill must parse every line (it skips one it cannot read, e.g. " = " in a comment,
    # and then `papermill --help-notebook` and its type checks do not know that parameter)
    import papermill
    from report import EXTRA_PARAMETERS     # tools/report.py
    assert set(papermill.inspect_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"))) == assigned
    assert set(EXTRA_PARAMETERS.get(name, ())) <= assigned, "the runner passes a parameter this notebook lacks"


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_default_parameters_pass_the_check(name, monkeypatch):
    for var in ("SAMLIB_PROFILE", "SAMLIB_DATA_DIR", "SAMLIB_RESULTS_DIR", "SAMLIB_RUNS_DIR",
                "SAMLIB_DEVICE", "SAMLIB_KAGGLE_FILE"):
        monkeypatch.delenv(var, raising=False)
    namespace: dict = {}
    exec("".join(_parameters_cell(_load(name))["source"]), namespace)
    params = {k: namespace[k] for k in set(nbparams.REQUIRED) | NOTEBOOKS[name]}
    p = nbparams.check_params(**params)
    assert p.profile in ("paper", "quick") and p.seeds and p.results.name == p.profile
    monkeypatch.setenv("SAMLIB_PROFILE", "smoke")           # what `make test` sets
    exec("".join(_parameters_cell(_load(name))["source"]), namespace)
    assert nbparams.check_params(**{k: namespace[k] for k in params}).profile == "smoke"


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_stored_notebook_has_outputs_only_in_checked_cells(name):
    for cell in _load(name)["cells"]:
        if cell["cell_type"] != "code":
            continue
        if nbfilter.CHECK_MARK not in "".join(cell["source"]):
            assert cell["outputs"] == [] and cell["execution_count"] is None, \
                "outputs belong only to # NBVAL_CHECK_OUTPUT cells (make strip)"
        else:   # nbval refuses stored outputs without an execution count ("unrun reference cell")
            assert cell["outputs"] and cell["execution_count"], \
                "a # NBVAL_CHECK_OUTPUT cell needs its output stored (make notebook-outputs)"


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_a_notebooks_default_output_folders_are_git_ignored_and_not_the_published_reports(name, monkeypatch):
    """Run unchanged, a notebook writes where git never looks: never into results/, the
    committed reports (`make publish` alone writes there)."""
    import subprocess

    for var in ("SAMLIB_RESULTS_DIR", "SAMLIB_RUNS_DIR"):
        monkeypatch.delenv(var, raising=False)
    namespace: dict = {}
    exec("".join(_parameters_cell(_load(name))["source"]), namespace)
    for key in ("results_dir", "runs_dir"):
        target = (ROOT / "notebooks" / namespace[key] / "smoke" / "summary.json").resolve()
        assert not target.is_relative_to(ROOT / "results"), (key, target)
        ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", str(target)])
        assert ignored.returncode == 0, f"{key} default {namespace[key]} is not git-ignored"


def test_make_report_writes_into_an_ignored_folder_and_publish_into_results():
    import subprocess

    dry = lambda *a: subprocess.run(["make", "-n", "-C", str(ROOT), *a], capture_output=True, text=True).stdout
    assert "--results local/results " in dry("report", "PROFILE=smoke")
    assert "RESULTS=results " in dry("publish", "PROFILE=quick")


@pytest.mark.slow
def test_running_a_notebook_unchanged_leaves_git_status_clean(tmp_path):
    """Notebook 00 run as a user runs it (papermill, defaults for the output folders) in a
    checkout: nothing git tracks or would add changes."""
    import os
    import shutil
    import subprocess
    import sys

    from samlib.data import synthetic_cifar10, write_cifar10

    checkout = tmp_path / "checkout"
    (checkout / "notebooks").mkdir(parents=True)
    shutil.copy(ROOT / ".gitignore", checkout)
    shutil.copy(ROOT / "notebooks" / "00_data_exploration.ipynb", checkout / "notebooks")
    git = lambda *a: subprocess.run(["git", "-C", str(checkout), *a], capture_output=True, text=True, check=True).stdout
    git("init", "-q")
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "checkout")
    write_cifar10(tmp_path / "data", synthetic_cifar10(300, 100, seed=0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMLIB_")}
    env.update(SAMLIB_PROFILE="smoke", SAMLIB_DATA_DIR=str(tmp_path / "data"))
    subprocess.run([sys.executable, "-m", "papermill", "-k", "python3", "--cwd", str(checkout / "notebooks"),
                    str(checkout / "notebooks" / "00_data_exploration.ipynb"), str(tmp_path / "executed.ipynb")],
                   env=env, check=True, capture_output=True, timeout=300)
    assert (checkout / "local" / "results" / "smoke" / "summary.json").exists()
    assert git("status", "--porcelain", "--untracked-files=all") == ""
