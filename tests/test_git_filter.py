"""Notebooks in git: the samlib-strip clean filter (`make git-filter`, .gitattributes) keeps
notebooks run in JupyterLab out of `git status`, and `scrub_paths` keeps this machine's absolute
paths out of committed executed reports."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from samlib.report import notebooks

ROOT = Path(__file__).resolve().parent.parent
CHECKED = "# NBVAL_CHECK_OUTPUT\nprint('a')\nprint('b')"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def _git(repo, *args, **kw):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               GIT_CONFIG_NOSYSTEM="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True, **kw).stdout


def _stored():
    """A notebook as committed: outputs only in the checked cell, numbered 1."""
    nb = new_notebook(metadata={"kernelspec": KERNELSPEC,
                                "language_info": {"name": "python", "pygments_lexer": "ipython3"}})
    nb.cells = [new_markdown_cell("# title"), new_code_cell("x = 41\nx + 1"),
                new_code_cell(CHECKED, execution_count=1,
                              outputs=[new_output("stream", name="stdout", text="a\nb\n")])]
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell{i}"
    return nb


def _executed():
    """The same notebook after a JupyterLab session: outputs and counts everywhere, the
    checked cell's stream in two pieces, JupyterLab's kernelspec, language_info and metadata."""
    nb = _stored()
    nb.metadata.kernelspec = dict(KERNELSPEC, display_name="Python 3 (ipykernel)")
    nb.metadata.language_info = {"name": "python", "version": "3.11.7", "mimetype": "text/x-python",
                                 "codemirror_mode": {"name": "ipython", "version": 3}}
    nb.cells[0].metadata["tags"] = []
    plain, checked = nb.cells[1], nb.cells[2]
    plain.execution_count = 7
    plain.metadata["execution"] = {"iopub.status.idle": "2026-01-01T00:00:00Z"}
    plain.outputs = [new_output("stream", name="stderr", text="warning\n"),
                     new_output("execute_result", data={"text/plain": "42"}, execution_count=7),
                     new_output("display_data", data={"image/png": "iVBORw0KGgo="})]
    checked.execution_count = 8
    checked.outputs = [new_output("stream", name="stdout", text="a\n"),
                       new_output("stream", name="stdout", text="b\n")]
    return nb


@pytest.fixture
def repo(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("no git")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "filter.samlib-strip.clean",
         f"{shlex.quote(sys.executable)} -m samlib.report.notebooks clean")
    shutil.copy(ROOT / ".gitattributes", tmp_path / ".gitattributes")
    (tmp_path / "notebooks").mkdir()
    nbformat.write(_stored(), str(tmp_path / "notebooks" / "n.ipynb"))
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "stored")
    return tmp_path


def test_executed_notebook_is_no_change_to_git(repo):
    """git diff shows nothing; `git status` may list the file until `git add` (it takes a new
    file size for a change without filtering), which then stages nothing and leaves it clean."""
    path = repo / "notebooks" / "n.ipynb"
    nbformat.write(_executed(), str(path))
    assert "warning" in path.read_text()                     # the working copy keeps its outputs
    _git(repo, "diff", "--exit-code")
    _git(repo, "add", "-A")
    _git(repo, "diff", "--cached", "--exit-code")
    assert _git(repo, "status", "--porcelain") == ""
    nbformat.write(_executed(), str(path))                   # run again: still nothing
    assert _git(repo, "status", "--porcelain") == ""
    staged = json.loads(_git(repo, "show", ":notebooks/n.ipynb"))
    assert staged["cells"][1]["outputs"] == [] and staged["cells"][1]["execution_count"] is None
    assert staged["cells"][2]["outputs"] == [{"name": "stdout", "output_type": "stream", "text": ["a\n", "b\n"]}]
    assert staged["cells"][2]["execution_count"] == 1


def test_a_real_edit_still_shows_without_outputs(repo):
    nb = _executed()
    nb.cells[1].source = "x = 1\nx + 1"
    nbformat.write(nb, str(repo / "notebooks" / "n.ipynb"))
    assert _git(repo, "status", "--porcelain").strip() == "M notebooks/n.ipynb"
    diff = _git(repo, "diff")
    assert '"x = 1\\n",' in diff and "warning" not in diff and "execution_count" not in diff


def test_stored_notebooks_are_fixed_points_of_the_filter():
    """`make git-filter` on a fresh clone leaves the committed notebooks unmodified."""
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        out = subprocess.run([sys.executable, "-m", "samlib.report.notebooks", "clean"], input=path.read_bytes(),
                             capture_output=True, check=True).stdout
        assert out == path.read_bytes(), f"{path.name}: run make strip"


@pytest.mark.parametrize("raw", [b"", b'<<<<<<< HEAD\n{"cells": []}\n=======\n'])
def test_what_is_not_a_notebook_passes_through(raw):
    out = subprocess.run([sys.executable, "-m", "samlib.report.notebooks", "clean"], input=raw,
                         capture_output=True, check=True)
    assert out.stdout == raw


def test_gitattributes_and_makefile_name_the_filter():
    assert "notebooks/*.ipynb filter=samlib-strip" in (ROOT / ".gitattributes").read_text().splitlines()
    assert "filter.samlib-strip.clean" in (ROOT / "Makefile").read_text()


# scrub_paths: a hand-made executed notebook whose paths are all under tmp_path

def _report(root: Path, home: Path, data: Path) -> nbformat.NotebookNode:
    nb = new_notebook(metadata={"kernelspec": KERNELSPEC, "papermill": {
        "input_path": f"{root}/notebooks/01.ipynb", "output_path": f"{root}/results/quick/01.ipynb",
        "parameters": {"data_dir": str(data), "runs_dir": f"{root}/runs"}}})
    params = new_code_cell(f'# Parameters\ndata_dir = "{data}"\nruns_dir = "{root}/runs"\n')
    params.metadata["tags"] = ["injected-parameters"]
    out = new_code_cell("p", outputs=[
        new_output("stream", name="stdout", text=f"data : at {data}  [50000 train]\n"
                                                 f"runs : {root}/runs/quick\nnotes in {home}/notes.txt.\n"
                                                 f"other: {root}2/x, {data}2 and {data}.bak\n"),
        new_output("execute_result", execution_count=1, data={
            "text/plain": f"PosixPath('{root}/runs/quick/final-s84-abc')", "image/png": f"AAA{root}AAA"})])
    nb.cells = [new_code_cell(f'print("{root}")'), params, out]
    return nb


def test_scrub_paths(tmp_path):
    home = tmp_path / "home"
    root, data = home / "work" / "repo", tmp_path / "mnt" / "cifar"
    path = tmp_path / "01.ipynb"
    nbformat.write(_report(root, home, data), str(path))
    table = notebooks.path_replacements([data, root / "runs", root / "results"], root=root, home=home)
    assert notebooks.scrub_paths(path, table) == 7   # 4 in metadata, 1 source, 2 outputs
    nb = nbformat.read(str(path), as_version=4)
    assert nb.metadata.papermill == {"input_path": "./notebooks/01.ipynb", "output_path": "results/quick/01.ipynb",
                                     "parameters": {"data_dir": "cifar", "runs_dir": "runs"}}
    assert nb.cells[0].source == f'print("{root}")'                      # code is not rewritten
    assert nb.cells[1].source == '# Parameters\ndata_dir = "cifar"\nruns_dir = "runs"\n'
    stream, result = nb.cells[2].outputs
    assert stream.text == (f"data : at cifar  [50000 train]\nruns : runs/quick\n"
                           f"notes in ~/notes.txt.\nother: ~/work/repo2/x, {data}2 and {data}.bak\n")
    assert result.data["text/plain"] == "PosixPath('runs/quick/final-s84-abc')"
    assert result.data["image/png"] == f"AAA{root}AAA"                   # images are left alone
    assert notebooks.scrub_paths(path, table) == 0


def test_path_replacements_default_to_the_repo_and_home():
    table = notebooks.path_replacements([ROOT / "data"])
    assert table[str(ROOT / "data")] == "data" and table[str(ROOT)] == "."
    assert table.get(str(Path.home()), "~") == "~" and "/" not in table
