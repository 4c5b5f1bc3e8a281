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

import nbfilter                         # tools/nbfilter.py

ROOT = Path(__file__).resolve().parent.parent
NBFILTER = str(ROOT / "tools" / "nbfilter.py")
CHECKED = "# NBVAL_CHECK_OUTPUT\nprint('a')\nprint('b')"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                GIT_CONFIG_NOSYSTEM="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
                GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")


def _git(repo, *args, **kw):
    return subprocess.run(["git", *args], cwd=repo, env=_env(), capture_output=True, text=True, check=True, **kw).stdout


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
         f"{shlex.quote(sys.executable)} {shlex.quote(NBFILTER)} clean %f")     # as make git-filter
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
        out = subprocess.run([sys.executable, NBFILTER, "clean"], input=path.read_bytes(),
                             capture_output=True, check=True).stdout
        assert out == path.read_bytes(), f"{path.name}: run make strip"


@pytest.mark.parametrize("raw", [b"", b'<<<<<<< HEAD\n{"cells": []}\n=======\n'])
def test_what_is_not_a_notebook_passes_through(raw):
    out = subprocess.run([sys.executable, NBFILTER, "clean"], input=raw,
                         capture_output=True, check=True)
    assert out.stdout == raw


def test_gitattributes_and_makefile_name_the_filter():
    assert "notebooks/*.ipynb filter=samlib-strip" in (ROOT / ".gitattributes").read_text().splitlines()
    assert "filter.samlib-strip.clean" in (ROOT / "Makefile").read_text()


# The reference outputs of the checked cells (nbfilter.keep_references): a partial, failed or interrupted run
# committed through the filter, or stripped, keeps the reference stored in HEAD.

REFERENCE = [{"name": "stdout", "output_type": "stream", "text": ["a\n", "b\n"]}]
READ_BACK = [{"name": "stdout", "output_type": "stream", "text": "a\nb\n"}]      # as nbformat reads it
ERROR = new_output("error", ename="ZeroDivisionError", evalue="division by zero", traceback=["Traceback", "1/0"])
INTERRUPT = new_output("error", ename="KeyboardInterrupt", evalue="", traceback=["KeyboardInterrupt"])


def _rerun(path, outputs, execution_count=8, later=None):
    """The working copy after a JupyterLab session whose checked cell shows `outputs`, and the
    cell after it, when `later` is given, shows that output."""
    nb = _executed()
    nb.cells[2].outputs, nb.cells[2].execution_count = outputs, execution_count
    if later is not None:
        nb.cells.append(new_code_cell("import time\ntime.sleep(99)", execution_count=9, outputs=[later]))
    nbformat.write(nb, str(path))
    return nb


def _staged_checked(repo, name="n.ipynb"):
    return json.loads(_git(repo, "show", f":notebooks/{name}"))["cells"][2]


@pytest.mark.parametrize("outputs, count, later", [
    ([], None, None),                                                        # (a) outputs cleared
    ([], 8, None),                                                           # ran, printed nothing (yet)
    ([new_output("stream", name="stdout", text="a\n"), ERROR], 8, None),     # (b) failed half-way
    ([new_output("stream", name="stdout", text="a\nb\n")], None, None),      # stale: not run
    ([new_output("stream", name="stdout", text="x\n")], 8, INTERRUPT),       # run interrupted later
    ([new_output("stream", name="stdout", text="x\n")], 8, ERROR),           # a later cell failed
], ids=["cleared", "empty", "error", "not-run", "interrupted", "later-error"])
def test_an_unfinished_run_keeps_the_reference(repo, outputs, count, later):
    path = repo / "notebooks" / "n.ipynb"
    _rerun(path, outputs, count, later)
    res = subprocess.run(["git", "add", "-A"], cwd=repo, env=_env(), capture_output=True, text=True, check=True)
    assert res.stderr == ""
    staged = _staged_checked(repo)
    assert staged["outputs"] == REFERENCE and staged["execution_count"] == 1
    if later is None:                          # nothing else changed: nothing staged, status clean
        _git(repo, "diff", "--cached", "--exit-code")
        assert _git(repo, "status", "--porcelain") == ""
    assert path.read_text().count('"output_type"') >= 3          # the working copy is left alone


def test_a_complete_run_replaces_the_reference(repo):
    """(c) how references are updated on purpose (make notebook-outputs)."""
    _rerun(repo / "notebooks" / "n.ipynb", [new_output("stream", name="stdout", text="a\n"),
                                            new_output("stream", name="stdout", text="c\n")])
    _git(repo, "add", "-A")
    staged = _staged_checked(repo)
    assert staged["outputs"] == [{"name": "stdout", "output_type": "stream", "text": ["a\n", "c\n"]}]
    assert staged["execution_count"] == 1


def test_an_edited_checked_cell_has_no_reference(repo):
    """No reference (a new or edited checked cell): git add still stages a stripped notebook,
    with one warning line, the error output dropped (failing would make git store it unstripped)."""
    nb = _executed()
    nb.cells[2].source += "\n1 / 0"
    nb.cells[2].outputs = [new_output("stream", name="stdout", text="a\nb\n"), ERROR]
    nbformat.write(nb, str(repo / "notebooks" / "n.ipynb"))
    res = subprocess.run(["git", "add", "-A"], cwd=repo, env=_env(), capture_output=True, text=True, check=True)
    assert len(res.stderr.splitlines()) == 1 and "notebooks/n.ipynb" in res.stderr
    assert "cell 3 (an error output)" in res.stderr and "make notebook-outputs" in res.stderr
    staged = json.loads(_git(repo, "show", ":notebooks/n.ipynb"))
    assert staged["cells"][2]["outputs"] == [] and staged["cells"][1]["outputs"] == []


def _strip(*paths, cwd=ROOT):
    return subprocess.run([sys.executable, NBFILTER, "strip", *map(str, paths)],
                          cwd=cwd, env=_env(), capture_output=True, text=True)


def test_strip_refuses_without_a_reference(repo):
    """(d) a new notebook (nothing in HEAD) whose checked cell has no output: one line, exit 1,
    the file byte for byte as it was; the other notebooks are still stripped."""
    new = repo / "notebooks" / "new.ipynb"
    _rerun(new, [], None)
    before = new.read_bytes()
    _rerun(repo / "notebooks" / "n.ipynb", [])
    res = _strip(new, "notebooks/n.ipynb", cwd=repo)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "new.ipynb: refused" in res.stderr and "cell 3 (no output)" in res.stderr
    assert new.read_bytes() == before
    assert "kept outputs of 1 checked cell(s)" in res.stdout                      # n.ipynb, from HEAD
    assert nbformat.read(str(repo / "notebooks" / "n.ipynb"), as_version=4).cells[2].outputs == READ_BACK


def test_strip_takes_the_reference_from_the_notebooks_own_repo(repo, tmp_path_factory):
    """Called from elsewhere (another directory, an absolute path), HEAD is the notebook's."""
    path = repo / "notebooks" / "n.ipynb"
    _rerun(path, [new_output("stream", name="stdout", text="a\n"), INTERRUPT])
    res = _strip(path, cwd=tmp_path_factory.mktemp("elsewhere"))
    assert res.returncode == 0, res.stderr
    assert nbformat.read(str(path), as_version=4).cells[2].outputs == READ_BACK
    _git(repo, "diff", "--exit-code")


def test_clean_without_a_path_still_works(repo):
    """A filter configured before %f (an old `make git-filter`): no HEAD to read, a warning."""
    nb = _executed()
    nb.cells[2].outputs = []
    res = subprocess.run([sys.executable, NBFILTER, "clean"], cwd=repo, env=_env(),
                         input=nbformat.writes(nb).encode(), capture_output=True, check=True)
    assert json.loads(res.stdout)["cells"][2]["outputs"] == []
    assert res.stderr.decode().count("\n") == 1 and b"<stdin>" in res.stderr


def test_identical_checked_cells_match_in_order(repo):
    path = repo / "notebooks" / "n.ipynb"
    nb = _stored()
    second = new_output("stream", name="stdout", text="2\n")
    nb.cells.append(new_code_cell(CHECKED, execution_count=2, outputs=[second]))
    nbformat.write(nb, str(path))
    _git(repo, "commit", "-q", "-am", "two")
    nb.cells[2].outputs, nb.cells[3].outputs = [new_output("stream", name="stdout", text="new\n")], []
    assert nbfilter.keep_references(nb, path) == []
    assert nb.cells[2].outputs[0]["text"] == "new\n" and nb.cells[3].outputs[0]["text"] == "2\n"


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
    root, data = home / "src" / "repo", tmp_path / "mnt" / "cifar"
    path = tmp_path / "01.ipynb"
    nbformat.write(_report(root, home, data), str(path))
    table = nbfilter.path_replacements([data, root / "runs", root / "results"], root=root, home=home)
    assert nbfilter.scrub_paths(path, table) == 7   # 4 in metadata, 1 source, 2 outputs
    nb = nbformat.read(str(path), as_version=4)
    assert nb.metadata.papermill == {"input_path": "./notebooks/01.ipynb", "output_path": "results/quick/01.ipynb",
                                     "parameters": {"data_dir": "cifar", "runs_dir": "runs"}}
    assert nb.cells[0].source == f'print("{root}")'                      # code is not rewritten
    assert nb.cells[1].source == '# Parameters\ndata_dir = "cifar"\nruns_dir = "runs"\n'
    stream, result = nb.cells[2].outputs
    assert stream.text == (f"data : at cifar  [50000 train]\nruns : runs/quick\n"
                           f"notes in ~/notes.txt.\nother: ~/src/repo2/x, {data}2 and {data}.bak\n")
    assert result.data["text/plain"] == "PosixPath('runs/quick/final-s84-abc')"
    assert result.data["image/png"] == f"AAA{root}AAA"                   # images are left alone
    assert nbfilter.scrub_paths(path, table) == 0


def test_path_replacements_default_to_the_repo_and_home():
    table = nbfilter.path_replacements([ROOT / "data"])
    assert table[str(ROOT / "data")] == "data" and table[str(ROOT)] == "."
    assert table.get(str(Path.home()), "~") == "~" and "/" not in table
