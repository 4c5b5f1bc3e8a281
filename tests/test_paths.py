"""Paths from outside, checked in one place (samlib.paths) before any work starts: a symlink
loop, a dangling link, a file where a folder belongs, a folder where a file belongs, a
read-only folder each end in one `error:` line, for every command and the notebooks."""
from __future__ import annotations

import os

import pytest

from samlib import cli
from samlib.errors import SamlibError


@pytest.fixture
def bad(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "folder").mkdir()
    return tmp_path


def one_error(capsys, argv) -> str:
    code = cli.main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.out + captured.err
    return lines[0]


NO_DATA = "/nonexistent-samlib-data"      # were the data read first, its error would show


@pytest.mark.parametrize("argv, expected", [
    (["train", "--data-dir", NO_DATA, "--out", "{bad}/afile"], "--out .*afile must be a folder, but it is a file"),
    (["train", "--data-dir", NO_DATA, "--out", "{bad}/afile/runs"], "cannot be written: its part .*afile is a file, not a folder"),
    (["train", "--data-dir", NO_DATA, "--out", "{bad}/loop"], "--out .*loop: a symbolic link in it points back"),
    (["train", "--data-dir", NO_DATA, "--out", "{bad}/dangling/runs"], "not found \\(a symbolic link to something"),
    (["train", "--data-dir", "{bad}/loop", "--out", "{bad}/runs"], "--data-dir .*loop: a symbolic link"),
    (["train", "--data-dir", "{bad}/dangling", "--download", "--out", "{bad}/r"], "--data-dir .*not found \\(a symbolic"),
    (["evaluate", "{bad}/loop", "--data-dir", NO_DATA], "the run directory .*loop: a symbolic link"),
    (["submit", "{bad}/folder", "--input", "{bad}/loop"], "--input .*loop: a symbolic link"),
    (["submit", "{bad}/folder", "--input", "{bad}/afile", "--output", "{bad}/folder"], "--output .*is a folder"),
    (["submit", "{bad}/folder", "--input", "{bad}/afile", "--output", "{bad}/afile/s.csv"], "its part .*afile is a file"),
    (["synthetic", "{bad}/afile"], "the folder .*afile must be a folder"),
    (["sweep", "--data-dir", NO_DATA, "--out", "{bad}/afile", "--plan"], "--out .*must be a folder"),
])   # benchmarks/bench.py's --out: tests/test_bench.py
def test_a_bad_path_is_one_error_line_before_any_work(bad, capsys, argv, expected):
    import re

    line = one_error(capsys, [a.replace("{bad}", str(bad)) for a in argv])
    assert re.search(expected, line), line


def test_a_read_only_output_folder_is_refused_before_any_work(bad, capsys, monkeypatch):
    """(Root writes anywhere, so the permission is simulated.)"""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith("folder") else real(p, mode))
    line = one_error(capsys, ["train", "--data-dir", NO_DATA, "--out", str(bad / "folder" / "runs")])
    assert "folder is read-only for this user; give a writable folder" in line


@pytest.mark.parametrize("results_dir, expected", [("afile", "must be a folder"), ("loop", "points back to itself"),
                                                   ("dangling/x", "not found")])
def test_a_notebooks_bad_output_folder_is_refused_at_its_parameters(bad, results_dir, expected):
    from samlib.report.params import check_params

    with pytest.raises(SamlibError, match=expected):
        check_params("smoke", bad, None, bad / results_dir, bad / "runs", "cpu")
