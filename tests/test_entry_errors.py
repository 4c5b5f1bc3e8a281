"""User mistakes at the report's entry points end in one `error:` line: a notebook cell that
raises a samlib error, and `make report`'s runner with bad parameters."""
from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

import report as runner                 # tools/report.py


def _run_cell(source: str):
    book = nbformat.v4.new_notebook()
    book.cells = [nbformat.v4.new_code_cell(source)]
    NotebookClient(book, kernel_name="python3", allow_errors=True, timeout=120).execute()
    return [o for o in book.cells[0].outputs if o["output_type"] == "error"]


@pytest.mark.slow
def test_a_samlib_error_in_a_notebook_cell_is_one_line_and_a_bug_keeps_its_traceback(tmp_path):
    errors = _run_cell(
        "from samlib.report import params\n"
        f"params.check_params(profile='smoke', data_dir={str(tmp_path)!r}, seeds='84', "
        f"results_dir={str(tmp_path)!r}, runs_dir={str(tmp_path)!r}, device='cpu')")
    assert len(errors) == 1 and errors[0]["ename"] == "ConfigError"
    assert errors[0]["traceback"] == [f"error: {errors[0]['evalue']}"]
    assert "notebook parameter seeds" in errors[0]["evalue"]
    bug = _run_cell("from samlib.report import params\n{}['missing']")
    assert bug[0]["ename"] == "KeyError" and len(bug[0]["traceback"]) > 1   # the full traceback


@pytest.mark.parametrize("args, words", [
    (["--profile", "bogus"], "profile must be"),
    (["--profile", "smoke", "--seeds", "84,x"], "seeds must be a comma-separated list"),
    (["--profile", "smoke", "--switches", "warmup"], "switches"),
    (["--profile", "smoke", "--device", "cuda:7"], "device"),
])
def test_the_report_runner_checks_parameters_before_writing_anything(tmp_path, capsys, args, words):
    code = runner.main([*args, "--data-dir", str(tmp_path), "--results", str(tmp_path / "results"),
                        "--runs", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and words in err and "Traceback" not in err
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()


def test_the_terminal_shows_the_plan_and_the_epoch_lines_and_nothing_else(tmp_path):
    """make report's terminal: the runner's filter passes exactly what samlib.plan and
    samlib.train print as progress (both generated here by the real functions)."""
    import io
    import types

    from samlib.plan import PlannedRun, format_plan
    from samlib.progress import epoch_line

    plan = format_plan([PlannedRun("final+schedule=as_written", 84, tmp_path, 200, 3, False, 95.0),
                        PlannedRun("baseline", 85, tmp_path, 200, 200, True, 0.0)], "NVIDIA T4")
    trainer = types.SimpleNamespace(
        cfg=types.SimpleNamespace(name="final", seed=84, epochs=200), epoch=3,
        metrics=[{"seconds": 4.0, "train_loss": 1.5, "val_acc": 0.5, "val_acc_ema": 0.6}] * 3)
    epoch = epoch_line(trainer, later_seconds=600)
    chatter = "profile    : paper\nrun directory: /x/final-s84-abc\nnote: cifar-10-batches-py does not carry"
    out = io.StringIO()
    stream = runner.ProgressOnly(out)
    for piece in (chatter, "\n", plan[:17], plan[17:], "\n", epoch, "\n", chatter, "\n"):
        stream.write(piece)                               # arbitrary chunking, as streams arrive
    assert out.getvalue() == plan + "\n" + epoch + "\n"
    assert "epoch 3/200" in epoch and "plan" in epoch


@pytest.mark.slow
def test_make_reports_runner_end_to_end_in_smoke(tmp_path, capsys):
    """The whole report in the smoke profile on synthetic data: one line per notebook plus
    the plan and epoch lines in the terminal, progress inside the executed notebook 01, and
    no absolute path of this machine left in the executed notebooks or summary.json."""
    import json
    import os
    from pathlib import Path

    from samlib.data import synthetic_cifar10, write_cifar10

    write_cifar10(tmp_path / "data", synthetic_cifar10(1200, 600, seed=0))
    code = runner.main(["--profile", "smoke", "--device", "cpu", "--data-dir", str(tmp_path / "data"),
                        "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines if " -> " in line] == list(runner.NOTEBOOKS)
    assert any("5 runs, 5 to train" in line for line in lines)            # the plan: 4 configs + 1 switch
    assert sum(": epoch " in line for line in lines) == 5 * 2              # 5 runs x 2 epochs
    assert len(lines) == 4 + 7 + 10                                        # nothing else
    executed = tmp_path / "results" / "smoke"
    book = json.loads((executed / "01_table1_ablation.ipynb").read_text())
    streams = "".join("".join(o.get("text", "")) for c in book["cells"] for o in c.get("outputs", []))
    assert "final seed 84: epoch 2/2" in streams and "left: run" in streams
    machine = [str(tmp_path), str(Path(__file__).resolve().parent.parent), os.path.expanduser("~")]
    for path in [*executed.glob("*.ipynb"), executed / "summary.json"]:
        text = path.read_text()
        assert not [m for m in machine if m in text], path.name
